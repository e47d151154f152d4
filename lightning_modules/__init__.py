"""LightningModules: DDPM and text-conditional LDM training on subset masks, the VAE of the LDM, and the
AttributionModule that scores trajectories."""
from lightning_modules.attribution_module import AttributionModule
from lightning_modules.ddpm import DDPMModule
from lightning_modules.ldm import LDMModule
from lightning_modules.vae import VAEModule

__all__ = ["AttributionModule", "DDPMModule", "LDMModule", "VAEModule"]
