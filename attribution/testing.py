"""Tiny diffusers models for tests and benchmarks (built from configs; nothing is downloaded).

diffusers is imported inside the functions so that ``import attribution`` stays light.
Models are returned in eval mode (a model built from a config starts in train mode).
"""
from __future__ import annotations

import torch

__all__ = ["tiny_unet", "tiny_cond_unet", "digits_unet", "cifar_unet", "CIFAR_UNET_PARAMS", "random_inputs"]

CIFAR_UNET_PARAMS = 35_746_307


def _seeded(seed: int):
    torch.manual_seed(seed)


def _cast(model, dtype):
    """``nn.Module.to`` (diffusers' own ``to`` warns about float32-only modules; tiny models have none)."""
    return torch.nn.Module.to(model.eval(), dtype=dtype)


def tiny_unet(seed: int = 0, dtype=torch.float32):
    """UNet2DModel, 1x8x8, channels (8, 16), self-attention in the lower block (~45k params)."""
    from diffusers import UNet2DModel

    _seeded(seed)
    return _cast(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4), dtype)


def tiny_cond_unet(seed: int = 0, dtype=torch.float32, cross_attention_dim: int = 6):
    """UNet2DConditionModel, 1x8x8, cross-attention to ``(L, cross_attention_dim)`` conditioning."""
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return _cast(UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=2), dtype)


def digits_unet(seed: int = 0):
    """The project's 8x8 digits UNet2DModel (channels (32, 64), no attention)."""
    from diffusers import UNet2DModel

    _seeded(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


def cifar_unet(seed: int = 0):
    """The google/ddpm-cifar10-32 architecture built from its config (35,746,307 params)."""
    from diffusers import UNet2DModel

    _seeded(seed)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
                       attention_head_dim=None).eval()


def random_inputs(batch: int, cond_dim=None, seed: int = 0, dtype=torch.float64):
    """Seeded ``x0 (B, 1, 8, 8)`` for the tiny models, and ``cond (B, 5, cond_dim)`` or None."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 1, 8, 8, generator=g, dtype=dtype)
    cond = None if cond_dim is None else torch.randn(batch, 5, cond_dim, generator=g, dtype=dtype)
    return x0, cond
