"""LightningModules: DDPM training on subset masks (and, later, the AttributionModule)."""
from lightning_modules.ddpm import DDPMModule

__all__ = ["DDPMModule"]
