"""A built wheel works without the source tree: build it from a clean copy of the checkout
(no generated stubs), install it into a fresh venv, and run the main job's first steps
(`data synth`, `train --config quick`, `index build`) from another directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_copy(dest: Path) -> Path:
    """The checkout as a fresh clone plus uncommitted work would hold it: tracked and
    untracked-but-not-ignored files (so no serving/_generated, no build output)."""
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        src = ROOT / raw.decode()
        if src.is_file() and not src.is_symlink():
            out = dest / raw.decode()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(src.read_bytes())
    return dest


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    p = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert p.returncode == 0, f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_synth_train_index_outside_the_checkout(tmp_path: Path) -> None:
    src = _source_copy(tmp_path / "src")
    assert not (src / "serving" / "_generated").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    # 1. build (no isolation: the build requirements are this venv's, nothing downloaded)
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = dist.glob("ecomrec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "ecomrec/configs/towers/quick.toml",
        "ecomrec/configs/towers/default.toml",
        "ecomrec/configs/serving/rerank.toml",
        "serving/_generated/ecomrec/v1/recommend_pb2.py",
        "serving/_generated/ecomrec/v1/recommend_pb2_grpc.py",
        "serving/dashboard/templates/base.html",  # `ecomrec dashboard`'s pages
        "serving/dashboard/templates/customer.html",
    } <= names

    # 2. a fresh venv: our code only from the wheel; third-party packages from this venv
    # (a .pth naming its site-packages: a plain path, so its editable-install hook for
    # the source tree is not run)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=env)
    py = venv / "bin" / "python"
    site = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=tmp_path,
            env=env,
        ).strip()
    )
    (site / "_third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        cwd=tmp_path,
        env=env,
    )
    where = _run(
        [
            str(py),
            "-c",
            "import ecomrec.cli, serving, training; "
            "print(ecomrec.cli.__file__); print(serving.__file__); print(training.__file__)",
        ],
        cwd=tmp_path,
        env=env,
    ).split()
    assert all(Path(w).is_relative_to(site) for w in where), where

    # 3. the commands, from a folder that is not the checkout
    work = tmp_path / "work"
    work.mkdir()
    ecomrec = [str(venv / "bin" / "ecomrec")]
    _run(
        [*ecomrec, "data", "synth", "--out", "shop", "--customers", "150", "--products", "40"],
        cwd=work,
        env=env,
    )
    assert (work / "shop" / "events.csv").is_file()
    _run(
        [
            *ecomrec,
            "train",
            "--dataset",
            "shop",
            "--config",
            "quick",
            "--out",
            "run",
            "--set",
            "threads=1",
            "--set",
            "item.use_text=false",
            "--no-test",
        ],
        cwd=work,
        env=env,
    )
    manifest = json.loads((work / "run" / "manifest.json").read_text())
    assert manifest["run_config"]["user"]["hidden"] == 32  # the built-in quick config was used
    out = _run(
        [*ecomrec, "index", "build", "--index", "index", "--model", "run", "--dataset", "shop"],
        cwd=work,
        env=env,
    )
    listed = json.loads(
        _run([*ecomrec, "index", "list", "--index", "index", "--json"], cwd=work, env=env)
    )
    (live,) = [v for v in listed if v["live"]]
    assert live["count"] == 40 and live["model_version"] in out


def test_the_image_copies_every_package_the_wheel_is_built_from() -> None:
    """deploy/Dockerfile installs the project like the wheel: every top-level package,
    protos/ and the build files (the layout moves; the COPY lines must follow)."""
    import re

    text = (ROOT / "deploy" / "Dockerfile").read_text()
    copied = {w for line in re.findall(r"^COPY (.+)$", text, re.M) for w in line.split()[:-1]}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    needed = packages | {"protos", "pyproject.toml", "setup.py"}
    assert needed <= copied, sorted(needed - copied)
    assert all((ROOT / c).exists() for c in copied), copied
    assert "pip install --no-cache-dir ." in text and " -e " not in text
