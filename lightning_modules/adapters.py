"""PEFT adapters (LoRA, ...) on a module's UNet, kept across checkpoints.

A UNet with adapters injected by ``peft.inject_adapter_in_model`` (the class stays ``UNet2DModel``; diffusers'
``UNet2DConditionModel.add_adapter`` does the same) or wrapped by ``peft.get_peft_model`` (a ``PeftModel``)
trains only its adapter parameters (peft freezes the base weights); featurizing then differentiates only those
(``attribution.gradients.parameter_order``) and the store records their names (``param_names``).
``DDPMModule`` checkpoints record the adapters' configurations (:func:`adapter_record`) so that
:func:`rebuild_adapters` gives the same network back from the UNet's configuration. peft is imported only when
a checkpoint records adapters.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from attribution.errors import SettingsError

__all__ = ["adapter_record", "base_network", "rebuild_adapters"]


def _is_wrapped(unet: torch.nn.Module) -> bool:
    get_base = getattr(unet, "get_base_model", None)
    return callable(get_base) and get_base() is not unet


def base_network(unet: torch.nn.Module) -> torch.nn.Module:
    """The diffusers UNet itself (inside a ``PeftModel`` wrapper, or ``unet``)."""
    return unet.get_base_model() if _is_wrapped(unet) else unet


def adapter_record(unet: torch.nn.Module) -> Optional[dict[str, Any]]:
    """``{"wrapped": bool, "configs": {adapter name: config dict}}`` of the UNet's PEFT adapters, or None."""
    configs = getattr(unet, "peft_config", None)
    if not configs:
        return None
    return {"wrapped": _is_wrapped(unet), "configs": {name: cfg.to_dict() for name, cfg in configs.items()}}


def rebuild_adapters(unet: torch.nn.Module, record: Optional[dict[str, Any]]) -> torch.nn.Module:
    """``unet`` (freshly built from its configuration) with the adapters of ``record`` added, as they were saved."""
    if not record:
        return unet
    try:
        from peft import get_peft_model, inject_adapter_in_model
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    except ImportError:
        raise SettingsError("Expected the `peft` package to rebuild the UNet's adapters recorded in the checkpoint "
                            f"({sorted(record['configs'])}), but it is not installed: pip install "
                            "'journey-trak[lora]' (peft==0.21.2)") from None

    def config(values: dict):
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[values["peft_type"]]  # e.g. LoraConfig
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__ and k != "peft_type"})

    items = list(record["configs"].items())
    if record["wrapped"]:
        name, first = items[0]
        unet = get_peft_model(unet, config(first), adapter_name=name)
        for name, values in items[1:]:
            unet.add_adapter(name, config(values))
        return unet
    for name, values in items:
        unet = inject_adapter_in_model(config(values), unet, adapter_name=name)
    return unet
