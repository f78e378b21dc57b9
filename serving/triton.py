"""Triton: export a model repository, and run a real Triton server for development and CI.

``ecomrec export triton --model RUN_DIR --out REPO`` writes::

    REPO/user_tower/config.pbtxt     platform onnxruntime_onnx, max_batch_size, dynamic
                                     batching, instance groups (a stock Triton loads it)
    REPO/user_tower/1/model.onnx     the user tower: int64 items/event_type/gap (B, T),
                                     lengths (B,) -> user_vector (B, D) L2-normalised
    REPO/user_tower/ecomrec.json     max_len, dim, model_version, tensor names

:class:`TritonProcess` starts ``serving/triton_server.py`` (nvidia-pytriton: the real
Triton server binary with the Python backend running onnxruntime on the same
``model.onnx``) inside ``.venv-triton``, waits until the model is ready, and stops it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ecomrec.errors import ModelError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".venv-triton"
MODEL_NAME = "user_tower"
OUTPUT_NAME = "user_vector"
INPUT_NAMES = ("items", "event_type", "gap", "lengths")


def config_pbtxt(
    name: str, dim: int, max_batch_size: int, instances: int, kind: str, queue_delay_us: int
) -> str:
    """``config.pbtxt`` of the ONNX user tower for a stock Triton server."""
    inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: TYPE_INT64 dims: [ -1 ] }}' for n in INPUT_NAMES[:3]
    )
    prefer = [b for b in (4, 8, 16, 32, 64) if b <= max_batch_size]
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
{inputs},
  {{ name: "lengths" data_type: TYPE_INT64 dims: [ 1 ] reshape: {{ shape: [ ] }} }}
]
output [
  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ {dim} ] }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(map(str, prefer))} ]
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [
  {{ count: {instances} kind: {kind} }}
]
"""


def export_triton(
    run_dir: str | Path,
    out: str | Path,
    *,
    name: str = MODEL_NAME,
    max_batch_size: int = 64,
    instances: int = 1,
    kind: str = "KIND_CPU",
    queue_delay_us: int = 200,
) -> Path:
    """Write a Triton model repository for the run's user tower; returns the model dir."""
    from towers.inference import load_run

    if kind not in ("KIND_CPU", "KIND_GPU"):
        raise ModelError(f"instance kind must be KIND_CPU or KIND_GPU, got {kind}")
    tm = load_run(run_dir)
    mdir = Path(out) / name
    (mdir / "1").mkdir(parents=True, exist_ok=True)
    onnx_path = mdir / "1" / "model.onnx"
    from towers.export import export_onnx  # the towers' exporter: one ONNX graph for every runtime

    with tempfile.TemporaryDirectory(prefix="ecomrec-export-") as tmp:
        paths = export_onnx(run_dir, tmp)
        shutil.move(str(paths["user_tower"]), onnx_path)
    (mdir / "config.pbtxt").write_text(
        config_pbtxt(name, tm.dim, max_batch_size, instances, kind, queue_delay_us)
    )
    meta = {
        "model_version": tm.model_version,
        "max_len": tm.max_len,
        "dim": tm.dim,
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "max_batch_size": max_batch_size,
        "max_queue_delay_us": queue_delay_us,
    }
    (mdir / "ecomrec.json").write_text(json.dumps(meta, indent=2))
    log.info("exported %s to %s", tm.model_version, mdir)
    return mdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def triton_python(venv: Path = DEFAULT_VENV) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        raise ModelError(f"{py} missing: create it with `bash serving/triton_venv.sh`")
    return py


def _libdir(py: Path) -> str:
    out = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


class TritonProcess:
    """A real Triton server (nvidia-pytriton) serving an exported repository on localhost."""

    def __init__(
        self,
        repo: str | Path,
        *,
        name: str = MODEL_NAME,
        grpc_port: int | None = None,
        venv: Path = DEFAULT_VENV,
        ready_timeout_s: float = 120.0,
        log_file: Path | None = None,
    ) -> None:
        self.repo = Path(repo)
        self.name = name
        self.grpc_port = grpc_port or free_port()
        self.venv = venv
        self.ready_timeout_s = ready_timeout_s
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self._workspace: Path | None = None
        self._log: Any = None
        self._log_path: Path | None = None
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> TritonProcess:
        py = triton_python(self.venv)
        env = dict(os.environ)
        lib = _libdir(py)
        env["LD_LIBRARY_PATH"] = (
            f"{lib}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else lib
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        self._workspace = Path(tempfile.mkdtemp(prefix="ecomrec-pytriton-"))
        self._log_path = self.log_file or self._workspace.with_suffix(".log")
        self._log = open(self._log_path, "wb")  # noqa: SIM115
        cmd = [
            str(py),
            str(ROOT / "serving" / "triton_server.py"),
            "--repo",
            str(self.repo),
            "--model",
            self.name,
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--workspace",
            str(self._workspace / "ws"),
        ]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        import tritonclient.grpc as tg

        client = tg.InferenceServerClient(self.url)
        try:
            while time.perf_counter() - t0 < self.ready_timeout_s:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    self.stop(keep_log=True)
                    raise ModelError(f"triton exited with {code}; see {self._log_path}")
                try:
                    if client.is_model_ready(self.name, client_timeout=1.0):
                        self.startup_s = time.perf_counter() - t0
                        log.info("triton ready on %s in %.1f s", self.url, self.startup_s)
                        return self
                except tg.InferenceServerException:
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        self.stop(keep_log=True)
        raise ModelError(f"triton not ready after {self.ready_timeout_s} s; see {self._log_path}")

    def stop(self, timeout_s: float = 15.0, keep_log: bool = False) -> None:
        """SIGTERM the server's process group, then SIGKILL if it does not exit.

        The server log is removed unless it was named by the caller or ``keep_log``."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
            if self.log_file is None and not keep_log and self._log_path is not None:
                self._log_path.unlink(missing_ok=True)
        if self._workspace is not None:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None

    def __enter__(self) -> TritonProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
