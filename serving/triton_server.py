"""Serve an exported user tower (``model.onnx`` of a Triton model repository) on a REAL
Triton server from ``nvidia-pytriton``.

Runs inside ``.venv-triton`` (numpy<2; see ``serving/triton_venv.sh``) and imports only
numpy, onnxruntime and pytriton, so it never touches the main venv.  Started and stopped
by :class:`serving.triton.TritonProcess`; the launcher sets ``LD_LIBRARY_PATH``.

    .venv-triton/bin/python serving/triton_server.py --repo REPO --grpc-port 8001
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("ecomrec.triton_server")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repo", required=True, type=Path)
    ap.add_argument("--model", default="user_tower")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--workspace", type=Path, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    model_dir = a.repo / a.model
    meta = json.loads((model_dir / "ecomrec.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        str(model_dir / "1" / "model.onnx"), so, providers=["CPUExecutionProvider"]
    )
    out_name = meta["output"]
    dim = int(meta["dim"])

    @batch  # type: ignore[misc]
    def infer(items: Any, event_type: Any, gap: Any, lengths: Any) -> dict[str, Any]:
        feeds = {
            "items": items.astype(np.int64),  # (B, T)
            "event_type": event_type.astype(np.int64),  # (B, T)
            "gap": gap.astype(np.int64),  # (B, T)
            "lengths": lengths.reshape(-1).astype(np.int64),  # (B,)
        }
        (vec,) = sess.run([out_name], feeds)
        return {out_name: vec.astype(np.float32)}  # (B, D)

    workspace = a.workspace or Path(tempfile.mkdtemp(prefix="pytriton-"))
    cfg = TritonConfig(
        grpc_port=a.grpc_port,
        http_port=a.http_port,
        metrics_port=a.metrics_port,
        grpc_address="127.0.0.1",
        http_address="127.0.0.1",
        metrics_address="127.0.0.1",
    )
    triton = Triton(config=cfg, workspace=str(workspace))
    triton.bind(
        model_name=a.model,
        infer_func=infer,
        inputs=[
            Tensor(name="items", dtype=np.int64, shape=(-1,)),
            Tensor(name="event_type", dtype=np.int64, shape=(-1,)),
            Tensor(name="gap", dtype=np.int64, shape=(-1,)),
            Tensor(name="lengths", dtype=np.int64, shape=(1,)),
        ],
        outputs=[Tensor(name=out_name, dtype=np.float32, shape=(dim,))],
        config=ModelConfig(
            max_batch_size=int(meta.get("max_batch_size", 64)),
            batcher=DynamicBatcher(
                max_queue_delay_microseconds=int(meta.get("max_queue_delay_us", 200))
            ),
        ),
        strict=True,
    )

    def stop(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping triton", signum)
        triton.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    log.info("serving %s on 127.0.0.1:%d (grpc)", a.model, a.grpc_port)
    triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
