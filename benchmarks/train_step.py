"""Time one training step of a fit config's UNet on random data (CPU figures for the LDS cost estimates).

Run:  .venv/bin/python benchmarks/train_step.py --config configs/ddpm_cifar10.yaml [--batch 8] [--steps 3]
      .venv/bin/python benchmarks/train_step.py --config configs/ldm_coco.yaml --text_encoder sd2

A step is what ``DDPMModule.training_step`` costs per batch: a forward and backward of the noise-prediction
MSE at random timesteps, an AdamW step and an EMA update (when the config keeps EMA). The UNet is built
from the config's ``model.init_args.unet`` (random weights, nothing downloaded); its input is random data of
its own shape (``in_channels x sample_size^2``: 3x32x32 for CIFAR-10, 4x16x16 latents for the LDM, whose
latents are cached so the VAE is not part of a step). A text-conditional UNet gets random (B, 77, D) states;
``--text_encoder sd2`` also times the frozen text encoder's forward (the LDM encodes every batch's
captions): Stable Diffusion 2's OpenCLIP ViT-H text tower (23 layers, 1024-d) built from its configuration.
Prints one JSON line: ms per step, images per second, the step's matmul/conv FLOPs per image (counted by
``torch.utils.flop_counter.FlopCounterMode`` over one untimed step: forward, backward and the text encoder;
not the optimizer's elementwise work), the CPU's achieved GFLOP/s, parameters and threads. With the FLOPs a
GPU's cost follows from an assumed sustained FLOP rate (the LDS plans' cost tables say which).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402


def build_unet(config: dict) -> torch.nn.Module:
    import diffusers

    unet = config["model"]["init_args"]["unet"]
    cls = getattr(diffusers, unet["class_path"].rsplit(".", 1)[-1])
    return cls(**unet["init_args"])


def sd2_text_encoder() -> torch.nn.Module:
    """Stable Diffusion 2.x's text encoder architecture (OpenCLIP ViT-H/14 text tower, 340M parameters)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                        num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                        hidden_act="gelu", projection_dim=1024)).eval()


def time_steps(config: dict, batch: int, steps: int, text_encoder: str | None) -> dict:
    torch.manual_seed(0)
    unet = build_unet(config).train()
    cfg = unet.config
    args = config["model"]["init_args"]
    ema = copy.deepcopy(unet).requires_grad_(False) if args.get("ema_decay") else None
    opt = torch.optim.AdamW(unet.parameters(), lr=float(args.get("lr", 1e-4)))
    cond_dim = getattr(cfg, "cross_attention_dim", None)
    encoder = sd2_text_encoder() if text_encoder == "sd2" else None
    x0 = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def step() -> None:
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        kwargs = {}
        if cond_dim:
            if encoder is not None:
                with torch.no_grad():
                    kwargs["encoder_hidden_states"] = encoder(torch.randint(0, 49408, (batch, 77))).last_hidden_state
            else:
                kwargs["encoder_hidden_states"] = torch.randn(batch, 77, cond_dim)
        loss = F.mse_loss(unet(x0 + noise, t, **kwargs).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema.parameters(), unet.parameters()):
                    e.lerp_(p, 1 - float(args["ema_decay"]))

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # also the warm-up step
        step()
    flops = counter.get_total_flops()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {"config": None, "batch": batch, "steps": steps, "ms_per_step": round(1000 * seconds, 1),
            "images_per_s": round(batch / seconds, 2), "gflop_per_image": round(flops / batch / 1e9, 2),
            "cpu_gflop_per_s": round(flops / seconds / 1e9, 1), "unet_params": sum(p.numel() for p in unet.parameters()),
            "text_encoder_params": sum(p.numel() for p in encoder.parameters()) if encoder else 0,
            "threads": torch.get_num_threads(), "sample": [cfg.in_channels, cfg.sample_size, cfg.sample_size]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a fit config whose model.init_args.unet is timed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text_encoder", choices=["sd2"], default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(args.config) as f:
        config = yaml.safe_load(f)
    result = time_steps(config, args.batch, args.steps, args.text_encoder)
    result["config"] = args.config
    result["text_encoder"] = args.text_encoder
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
