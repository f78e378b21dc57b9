"""DDP training with 2 CPU processes (gloo), launched for real by ``ecomrec train --nproc 2``
(torchrun): each rank trains on its own disjoint share of every global batch, the loss curve
matches one process, and a run SIGKILLed from outside at a random step resumes to the same
weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from intake.synthetic import SyntheticConfig, make_shop
from towers.model import load_checkpoint
from training.distributed import shard_batches, torchrun_command

CLI_EPOCHS = 4


def test_shards_split_every_global_batch_by_user() -> None:
    plan = [np.arange(10), np.arange(10, 13), np.array([13])]
    parts = [shard_batches(plan, r, 2) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3  # same number of steps on every rank
    for i in range(2):  # disjoint and complete
        got = np.sort(np.concatenate([parts[0][i], parts[1][i]]))
        assert got.tolist() == np.sort(plan[i]).tolist()
    # one user, two ranks: the empty rank repeats the batch (the average stays its gradient)
    assert parts[0][2].tolist() == parts[1][2].tolist() == [13]


def test_torchrun_command_runs_ecomrec_under_torch_distributed() -> None:
    cmd = torchrun_command(2, ["train", "--dataset", "x", "--out", "y"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[-7:] == ["-m", "ecomrec", "train", "--dataset", "x", "--out", "y"]


def _train_cmd(data: Path, out: Path, nproc: int) -> list[str]:
    sets = {
        "threads": 1,
        "device": '"cpu"',
        "autocast": '"off"',
        "item.dim": 16,
        "item.use_text": "false",
        "user.hidden": 16,
        "user.n_heads": 2,
        "user.n_layers": 1,
        "user.max_len": 10,
        "user.dropout": 0.0,
        "user.attention_dropout": 0.0,
        "pretrain.epochs": CLI_EPOCHS,
        "pretrain.batch_size": 32,
        "pretrain.lr": 0.01,
        "pretrain.patience": CLI_EPOCHS,
        "pretrain.softmax": '"full"',
    }  # no dropout and a full softmax: nothing random differs between 1 and 2 processes
    cmd = [sys.executable, "-m", "ecomrec", "train", "--dataset", str(data), "--out", str(out)]
    cmd += ["--config", "quick", "--no-test", "--nproc", str(nproc)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def _env(batch_log: Path) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1", ECOMREC_BATCH_LOG=str(batch_log))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    return env


def _train(data: Path, out: Path, nproc: int, batch_log: Path) -> None:
    done = subprocess.run(
        _train_cmd(data, out, nproc), env=_env(batch_log), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


Step = tuple[str, int, int]  # (stage, epoch, step)


def _read_log(folder: Path, rank: int) -> dict[Step, dict[str, Any]]:
    f = folder / f"rank{rank}.jsonl"
    if not f.exists():
        return {}
    rows = [json.loads(ln) for ln in f.read_text().splitlines() if ln.endswith("}")]
    return {(r["stage"], r["epoch"], r["step"]): r for r in rows}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt, _ = load_checkpoint(run / "model.pt")
    return dict(ckpt.model.state_dict())


@pytest.mark.slow
def test_torchrun_ranks_share_each_batch_and_survive_sigkill(tmp_path: Path) -> None:
    ds = make_shop(SyntheticConfig(n_users=1200, n_items=80, n_categories=4, mean_len=8))
    data = tmp_path / "data"
    ds.save(data)

    _train(data, tmp_path / "one", 1, tmp_path / "log1")
    _train(data, tmp_path / "two", 2, tmp_path / "log2")
    one = _read_log(tmp_path / "log1", 0)
    r0, r1 = _read_log(tmp_path / "log2", 0), _read_log(tmp_path / "log2", 1)
    steps_per_epoch = sum(1 for k in one if k[1] == 0)
    assert steps_per_epoch >= 20 and len(one) == CLI_EPOCHS * steps_per_epoch
    assert set(r0) == set(r1) == set(one)  # same number of steps on every rank
    for key, whole in one.items():
        a, b = set(r0[key]["users"]), set(r1[key]["users"])
        # each rank sees its own half of the global batch: disjoint, together all of it
        assert a and b and not a & b, key
        assert sorted(a | b) == sorted(whole["users"]), key
        assert abs(len(a) - len(b)) <= 1, key
    # gradients averaged over the two ranks: the loss curve of one process
    l1 = np.array([one[k]["loss"] for k in sorted(one)])
    l2 = np.array([r0[k]["loss"] for k in sorted(one)])
    assert np.abs(l2 - l1).max() < 0.02 * np.abs(l1).max(), np.abs(l2 - l1).max()
    assert l1[-steps_per_epoch:].mean() < l1[:steps_per_epoch].mean() - 0.3  # it learned
    man1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    man2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert abs(man2["best_valid_ndcg@10"] - man1["best_valid_ndcg@10"]) < 0.05
    assert not (tmp_path / "two" / "last.pt").exists()  # completed runs drop the resume state

    # SIGKILL from outside (torchrun and both ranks) at a random step after epoch 1
    rng = random.Random()
    target = ("pretrain", rng.randrange(1, CLI_EPOCHS - 1), rng.randrange(steps_per_epoch))
    run, log3 = tmp_path / "killed", tmp_path / "log3"
    proc = subprocess.Popen(
        _train_cmd(data, run, 2), env=_env(log3), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while target not in _read_log(log3, 0) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never reached the kill target"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"the run ended before {target}"
    reached = max(_read_log(log3, 0))
    assert reached >= target and not (run / "manifest.json").exists()
    assert (run / "last.pt").exists()

    # the same command again resumes from the last finished epoch, to the same weights
    _train(data, run, 2, tmp_path / "log4")
    resumed = _read_log(tmp_path / "log4", 0)
    first = min(resumed)
    assert first[1] <= reached[1] and first[2] == 0, (first, reached)
    for key, row in resumed.items():  # the same batches as the run never killed
        assert row["users"] == r0[key]["users"], key
    assert sorted(resumed) == [k for k in sorted(one) if k >= first]
    want = _weights(tmp_path / "two")
    for k, x in _weights(run).items():
        torch.testing.assert_close(x, want[k], rtol=1e-5, atol=1e-6, msg=k)
