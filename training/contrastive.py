"""Stage 2, contrastive two-tower fine-tuning: full, LoRA (peft) or bottom-N-frozen.

The user vector of a prefix is pulled towards the item that followed it, against
in-batch positives of other users plus popularity-sampled negatives, with logQ
correction and a temperature (or the full softmax when ``softmax = "full"``).
LoRA adapters go on the user tower's attention (and optionally FFN) projections;
``modules_to_save`` keeps the item embeddings trainable, because with a model
pretrained from scratch on ids, freezing them freezes the catalogue. After training
the adapters are merged so the saved model is a plain :class:`TwoTower`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ecomrec.errors import ConfigError
from towers.model import TwoTower
from training.pretrain import OptimConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContrastiveConfig(OptimConfig):
    """Stage 2 settings (defaults: disabled; sampled softmax with logQ)."""

    enabled: bool = False
    softmax: Literal["full", "sampled"] = "sampled"
    mode: Literal["full", "lora", "frozen"] = "full"
    positions: Literal["all", "last"] = "all"  # which prefixes form (user, next item) pairs
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "value")
    lora_modules_to_save: tuple[str, ...] = ("id_emb",)
    frozen_layers: int = 1  # mode "frozen": bottom N transformer layers (+ embeddings) frozen

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "lora" and self.lora_r < 1:
            raise ConfigError("contrastive.lora_r must be >= 1")


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prepare_finetune(model: TwoTower, cfg: ContrastiveConfig) -> nn.Module:
    """Set up ``model`` for the fine-tuning mode; returns the module to optimise."""
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.mode == "full":
        return model
    if cfg.mode == "frozen":
        enc: Any = model.user_tower.encoder
        n = len(enc.encoder.layer)
        if cfg.frozen_layers > n:
            raise ConfigError(f"frozen_layers={cfg.frozen_layers} but the tower has {n} layers")
        for p in enc.embeddings.parameters():
            p.requires_grad_(False)
        for layer in enc.encoder.layer[: cfg.frozen_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        modules_to_save=list(cfg.lora_modules_to_save) or None,
    )
    peft_model = get_peft_model(model, lcfg)  # type: ignore[arg-type]
    return peft_model


def finish_finetune(module: nn.Module, cfg: ContrastiveConfig) -> TwoTower:
    """Merge LoRA adapters back (mode lora) and return a plain TwoTower."""
    if cfg.mode == "lora":
        merged = module.merge_and_unload()  # type: ignore[operator]
        assert isinstance(merged, TwoTower)
        model = merged
    else:
        assert isinstance(module, TwoTower)
        model = module
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def base_model(module: nn.Module) -> TwoTower:
    """The TwoTower inside a (possibly peft-wrapped) module, for encoding."""
    if isinstance(module, TwoTower):
        return module
    wrapped: Any = module
    inner: Any = wrapped.base_model.model  # peft: PeftModel -> LoraModel -> our module
    assert isinstance(inner, TwoTower)
    return inner
