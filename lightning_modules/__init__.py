"""LightningModules: DDPM and text-conditional LDM training on subset masks, the VAE of the LDM, and the
AttributionModule that scores trajectories; ``PretrainedDiffusion`` builds a DDPM/LDM module around a diffusers
pipeline folder (``--model=lightning_modules.PretrainedDiffusion --model.path=<folder>``)."""
from lightning_modules.attribution_module import AttributionModule
from lightning_modules.ddpm import DDPMModule
from lightning_modules.ldm import LDMModule
from lightning_modules.loading import PretrainedDiffusion
from lightning_modules.vae import VAEModule

__all__ = ["AttributionModule", "DDPMModule", "LDMModule", "PretrainedDiffusion", "VAEModule"]
