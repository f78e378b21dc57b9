"""User encoders for serving: in-process (torch) and Triton (``tritonclient.grpc``).

Both implement the ``towers.inference.UserEncoder`` protocol (``dim`` and
``encode(batch) -> (B, D)`` float32, L2-normalised).  :class:`FallbackEncoder` puts
Triton first and the in-process tower second: when Triton is down the answer comes
from the local model and is marked degraded; a short circuit breaker stops every
request paying the connection timeout while Triton stays down.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ecomrec.errors import ModelError
from towers.sequences import SequenceBatch

log = logging.getLogger(__name__)

#: Triton input names, in the order of the exported ONNX user tower.
TRITON_INPUTS = ("items", "event_type", "gap", "lengths")


@runtime_checkable
class UserEncoder(Protocol):
    """Structural twin of ``towers.inference.UserEncoder``."""

    @property
    def dim(self) -> int: ...

    def encode(self, batch: SequenceBatch) -> np.ndarray:
        """(B, D) float32, L2-normalised."""
        ...


class EncoderUnavailableError(ModelError):
    """The encoder cannot answer now (Triton down, timed out)."""


class InProcessEncoder:
    """The trained tower in this process (``TrainedModel.user_encoder()``)."""

    def __init__(self, inner: UserEncoder, name: str = "inprocess") -> None:
        self.inner = inner
        self.name = name

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    def encode(self, batch: SequenceBatch) -> np.ndarray:
        out = np.asarray(self.inner.encode(batch), dtype=np.float32)  # (B, D)
        return out


class TowerEncoder:
    """The trained tower's own ``TwoTower.encode`` under ``torch.inference_mode``.

    Same computation as ``TrainedModel.user_encoder()`` (vectors identical), minus the
    per-call ``eval()``/``train()`` toggles that walk every module (about a third of a
    batch-1 call on CPU) and are unsafe with concurrent requests: the model is put in
    eval mode once here and never switched.
    """

    def __init__(self, model: Any, max_len: int) -> None:
        import torch

        self.model = model.eval()
        self.max_len = max_len
        self.dim = int(model.dim)
        self._device = next(model.parameters()).device
        with torch.inference_mode():
            self._table = model.item_table()  # (N+1, D) computed once

    def encode(self, batch: SequenceBatch) -> np.ndarray:
        import torch

        from towers.inference import batch_tensors

        t = batch_tensors(batch, self._device)
        if t["items"].shape[1] > self.max_len:
            t = {k: (v[:, -self.max_len :] if v.dim() == 2 else v) for k, v in t.items()}
        with torch.inference_mode():
            u = self.model.encode(
                t["items"], t["event_type"], t["gap"], t["lengths"], table=self._table
            )  # (B, D)
            u = u * (t["lengths"] > 0).unsqueeze(1).to(u.dtype)  # empty sequences -> zero vectors
        return u.float().cpu().numpy()


class OnnxEncoder:
    """The exported user tower (``towers.export``) on onnxruntime, in this process.

    Same graph Triton serves; no Python per module, and ``run`` releases the GIL, so it is
    the cheapest in-process path on CPU.  ``path`` is a ``model.onnx`` (e.g. from
    ``export triton``); :meth:`from_run` exports one to a temporary directory.
    """

    name = "onnx"

    def __init__(self, path: str | bytes, dim: int, threads: int = 1) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        model = path if isinstance(path, bytes) else str(path)
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.dim = int(dim)
        self._out = self.session.get_outputs()[0].name

    @classmethod
    def from_run(cls, run_dir: str, dim: int, threads: int = 1) -> OnnxEncoder:
        import tempfile

        from towers.export import export_onnx

        with tempfile.TemporaryDirectory(prefix="ecomrec-onnx-") as tmp:
            blob = export_onnx(run_dir, tmp)["user_tower"].read_bytes()
        return cls(blob, dim, threads)

    def encode(self, batch: SequenceBatch) -> np.ndarray:
        feeds = {
            "items": batch.items.astype(np.int64),  # (B, T)
            "event_type": batch.event_type.astype(np.int64),  # (B, T)
            "gap": batch.gap.astype(np.int64),  # (B, T)
            "lengths": batch.lengths.astype(np.int64),  # (B,)
        }
        (u,) = self.session.run([self._out], feeds)  # (B, D)
        return np.asarray(u, np.float32) * (batch.lengths > 0)[:, None]


def concat_batches(batches: list[SequenceBatch]) -> SequenceBatch:
    """Stack right-padded batches into one, zero-padding to the widest (what pad_batch does)."""
    t = max(b.items.shape[1] for b in batches)

    def cat(name: str) -> np.ndarray:
        parts = []
        for b in batches:
            x = getattr(b, name)  # (b, T_i)
            parts.append(np.pad(x, ((0, 0), (0, t - x.shape[1]))) if x.shape[1] < t else x)
        return np.concatenate(parts)  # (B, T)

    return SequenceBatch(
        items=cat("items"),
        event_type=cat("event_type"),
        gap=cat("gap"),
        lengths=np.concatenate([b.lengths for b in batches]),
    )


class MicroBatchingEncoder:
    """Merges concurrent requests into one forward pass (in-process dynamic batching).

    A request waits at most ``max_wait_s`` for company; one worker thread runs the
    forward for up to ``max_batch`` users.  At batch 1 a small tower's CPU time is mostly
    Python overhead per module, so batching raises throughput several-fold under load.
    """

    def __init__(self, inner: UserEncoder, max_batch: int = 16, max_wait_s: float = 0.0005) -> None:
        import queue
        from concurrent.futures import Future

        self.inner = inner
        self.dim = int(inner.dim)
        self.name = getattr(inner, "name", "inprocess")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._q: queue.Queue[tuple[SequenceBatch, Future[np.ndarray]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ecomrec-encoder", daemon=True)
        self._thread.start()
        self.batches = 0
        self.requests = 0

    def encode(self, batch: SequenceBatch) -> np.ndarray:
        from concurrent.futures import Future

        fut: Future[np.ndarray] = Future()
        self._q.put((batch, fut))
        return fut.result()

    def _run(self) -> None:
        import queue

        while True:
            first = self._q.get()
            if first is None:
                return
            work = [first]
            n = len(first[0].lengths)
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_batch:
                try:
                    nxt = self._q.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                work.append(nxt)
                n += len(nxt[0].lengths)
            try:
                out = self.inner.encode(concat_batches([b for b, _ in work]))  # (n, D)
                start = 0
                for b, fut in work:
                    m = len(b.lengths)
                    fut.set_result(np.asarray(out[start : start + m], np.float32))
                    start += m
            except BaseException as e:  # hand the failure to every waiting request
                for _, fut in work:
                    fut.set_exception(e)
            self.batches += 1
            self.requests += len(work)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=2)


def quantize_int8(trained: Any) -> UserEncoder:
    """In-process encoder over an int8 dynamically quantised copy of the user tower (CPU).

    Linear layers get int8 weights and dynamically quantised activations; the item table
    (the tower's inputs) stays float32, computed once from the unquantised item tower.
    """
    import copy

    import torch

    model = copy.deepcopy(trained.model).eval()
    model.user_tower = torch.ao.quantization.quantize_dynamic(
        model.user_tower, {torch.nn.Linear}, dtype=torch.qint8
    )
    return TowerEncoder(model, trained.max_len)


class TritonEncoder:
    """The exported user tower on a Triton server, over gRPC.

    Batches are padded to ``max_len`` so every request has the same shape and Triton's
    dynamic batcher can merge concurrent requests.  ``lengths`` travels as ``(B, 1)``
    (the model configuration reshapes it to ``(B,)``).
    """

    name = "triton"

    def __init__(
        self,
        url: str,
        model_name: str,
        max_len: int,
        *,
        dim: int | None = None,
        timeout_s: float = 1.0,
        output_name: str | None = None,
    ) -> None:
        import tritonclient.grpc as tg  # heavy optional import

        self._tg = tg
        self.url = url
        self.model_name = model_name
        self.max_len = max_len
        self.timeout_s = timeout_s
        self._client = tg.InferenceServerClient(url=url, verbose=False)
        self._output = output_name
        self._dim = dim
        self._meta_lock = threading.Lock()

    def _ensure_meta(self) -> None:
        if self._output is not None and self._dim is not None:
            return
        with self._meta_lock:
            try:
                meta = self._client.get_model_metadata(
                    self.model_name, as_json=True, client_timeout=self.timeout_s
                )
            except self._tg.InferenceServerException as e:
                raise EncoderUnavailableError(f"triton {self.url}: {e.message()}") from e
            out = meta["outputs"][0]
            self._output = self._output or out["name"]
            self._dim = self._dim or int(out["shape"][-1])

    @property
    def dim(self) -> int:
        self._ensure_meta()
        assert self._dim is not None
        return self._dim

    def is_ready(self) -> bool:
        """True when the server answers and the model is loaded."""
        try:
            return bool(self._client.is_model_ready(self.model_name, client_timeout=self.timeout_s))
        except self._tg.InferenceServerException:
            return False

    def encode(self, batch: SequenceBatch, timeout_s: float | None = None) -> np.ndarray:
        self._ensure_meta()
        tg = self._tg
        b, t = batch.items.shape
        width = max(self.max_len, t)

        def padded(x: np.ndarray) -> np.ndarray:
            out = np.zeros((b, width), np.int64)  # (B, max_len)
            out[:, :t] = x
            return out

        arrays = {
            "items": padded(batch.items),
            "event_type": padded(batch.event_type),
            "gap": padded(batch.gap),
            "lengths": batch.lengths.astype(np.int64).reshape(b, 1),  # (B, 1)
        }
        inputs = []
        for name in TRITON_INPUTS:
            inp = tg.InferInput(name, list(arrays[name].shape), "INT64")
            inp.set_data_from_numpy(arrays[name])
            inputs.append(inp)
        try:
            res = self._client.infer(
                self.model_name,
                inputs,
                outputs=[tg.InferRequestedOutput(self._output)],
                client_timeout=timeout_s or self.timeout_s,
            )
        except tg.InferenceServerException as e:
            raise EncoderUnavailableError(f"triton {self.url}: {e.message()}") from e
        out = res.as_numpy(self._output)
        if out is None or out.shape[0] != b:
            raise EncoderUnavailableError(f"triton {self.url}: empty or short answer")
        return np.asarray(out, dtype=np.float32).reshape(b, -1)  # (B, D)

    def close(self) -> None:
        self._client.close()


class FallbackEncoder:
    """``primary`` (Triton) first, ``secondary`` (in-process) when it fails.

    After a failure the primary is skipped for ``cooldown_s`` seconds (then tried
    again), so an outage costs one timeout, not one per request.
    """

    def __init__(
        self, primary: Any, secondary: UserEncoder | None, cooldown_s: float = 2.0
    ) -> None:
        self.primary = primary
        self.secondary = secondary
        self.cooldown_s = cooldown_s
        self._down_until = 0.0
        self.name = getattr(primary, "name", "primary")
        self.primary_failures = 0  # calls the primary failed
        self.primary_skipped = 0  # calls answered by the secondary without trying the primary

    @property
    def dim(self) -> int:
        if self.secondary is not None:
            return int(self.secondary.dim)
        return int(self.primary.dim)

    def encode(self, batch: SequenceBatch) -> np.ndarray:
        return self.encode_with_status(batch)[0]

    def encode_with_status(
        self, batch: SequenceBatch, timeout_s: float | None = None
    ) -> tuple[np.ndarray, bool]:
        """(vectors ``(B, D)``, degraded): degraded is True when the secondary answered."""
        if time.monotonic() < self._down_until:
            self.primary_skipped += 1
        else:
            try:
                if timeout_s is not None and isinstance(self.primary, TritonEncoder):
                    return self.primary.encode(batch, timeout_s=timeout_s), False
                return self.primary.encode(batch), False
            except EncoderUnavailableError as e:
                if self.secondary is None:
                    raise
                self.primary_failures += 1
                self._down_until = time.monotonic() + self.cooldown_s
                log.warning("encoder %s unavailable, using the in-process tower: %s", self.name, e)
        if self.secondary is None:
            raise EncoderUnavailableError(f"encoder {self.name} is down and there is no fallback")
        return np.asarray(self.secondary.encode(batch), np.float32), True


def encode_with_status(
    encoder: Any, batch: SequenceBatch, timeout_s: float | None = None
) -> tuple[np.ndarray, bool]:
    """Any encoder -> (vectors, degraded)."""
    if isinstance(encoder, FallbackEncoder):
        return encoder.encode_with_status(batch, timeout_s)
    if isinstance(encoder, TritonEncoder):
        return encoder.encode(batch, timeout_s=timeout_s), False
    return np.asarray(encoder.encode(batch), np.float32), False
