"""LightningModules: DDPM training on subset masks and the AttributionModule that scores trajectories."""
from lightning_modules.attribution_module import AttributionModule
from lightning_modules.ddpm import DDPMModule

__all__ = ["AttributionModule", "DDPMModule"]
