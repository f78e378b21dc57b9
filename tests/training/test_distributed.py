"""DDP training with 2 CPU processes (gloo): parity with 1 process, resume, torchrun CLI."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from intake.synthetic import SyntheticConfig, make_shop
from towers.model import load_checkpoint
from towers.sequences import Interactions
from training.distributed import (
    DistEnv,
    DistributedTrainer,
    init_process_group,
    shard_batches,
    torchrun_command,
)
from training.splits import leave_one_out
from training.trainer import RunConfig, Trainer, load_run_config

EPOCHS = 3


def small_shop() -> tuple[Any, Any]:
    ds = make_shop(SyntheticConfig(n_users=160, n_items=60, n_categories=4, mean_len=8))
    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    return ds, leave_one_out(inter)


def run_config() -> RunConfig:
    # no dropout and a full softmax: nothing random differs between 1 and 2 processes
    return load_run_config(
        None,
        threads=1,
        device="cpu",
        autocast="off",
        tensorboard=False,
        progress=False,
        item={"dim": 16, "use_text": False},
        user={
            "hidden": 16,
            "n_heads": 2,
            "n_layers": 1,
            "max_len": 10,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
        pretrain={
            "epochs": EPOCHS,
            "batch_size": 32,
            "lr": 0.01,
            "patience": EPOCHS,
            "temperature": 0.1,
            "softmax": "full",
        },
    )


class _Stop(Exception):
    pass


class _StopAfter(DistributedTrainer):
    """Dies at the start of epoch ``stop`` (last.pt of the epoch before is on disk)."""

    stop = 2

    def _shard_plan(self, plan: list[np.ndarray]) -> list[np.ndarray]:
        self._epochs = getattr(self, "_epochs", 0) + 1
        if self._epochs > self.stop:
            raise _Stop
        return super()._shard_plan(plan)


def _worker(rank: int, world: int, port: int, run_dir: str, interrupt: bool) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    env = DistEnv.from_env()
    assert env is not None
    init_process_group(env, "cpu")
    ds, split = small_shop()
    cls = _StopAfter if interrupt else DistributedTrainer
    trainer = cls(run_config(), ds.items, ds.item_ids.external_ids, run_dir)
    with contextlib.suppress(_Stop):
        trainer.fit(split.train, split.valid)
    if rank == 0:
        name = "losses_interrupted.json" if interrupt else "losses.json"
        (Path(run_dir) / name).write_text(json.dumps(trainer.step_losses))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two(run_dir: Path, interrupt: bool = False) -> list[float]:
    mp.start_processes(
        _worker, args=(2, _free_port(), str(run_dir), interrupt), nprocs=2, start_method="spawn"
    )
    name = "losses_interrupted.json" if interrupt else "losses.json"
    return list(json.loads((run_dir / name).read_text()))


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


@pytest.mark.slow
def test_two_processes_match_one_step_by_step_and_resume_exactly(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    ds, split = small_shop()
    one = Trainer(run_config(), ds.items, ds.item_ids.external_ids, tmp_path / "one")
    _m1, man1 = one.fit(split.train, split.valid)
    l1 = np.array(one.step_losses)

    l2 = np.array(run_two(tmp_path / "two"))
    # same global batches, gradients averaged over 2 processes: the loss curve matches
    assert len(l2) == len(l1) and len(l1) >= EPOCHS * 4
    assert np.abs(l2 - l1).max() < 0.02 * np.abs(l1).max(), np.abs(l2 - l1).max()
    assert l1[-1] < l1[0] - 0.3  # it learned something (the comparison is not of noise)
    man2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    v1 = man1["best_valid_ndcg@10"]
    assert abs(man2["best_valid_ndcg@10"] - v1) < 0.05
    assert not (tmp_path / "two" / "last.pt").exists()  # completed runs drop the resume state

    # killed at the start of epoch 3, restarted: the same steps and the same weights
    part = run_two(tmp_path / "resumed", interrupt=True)
    assert (tmp_path / "resumed" / "last.pt").exists()
    rest = run_two(tmp_path / "resumed")
    np.testing.assert_allclose(part + rest, l2, rtol=1e-5, atol=1e-6)
    a, _ = load_checkpoint(tmp_path / "two" / "model.pt")
    b, _ = load_checkpoint(tmp_path / "resumed" / "model.pt")
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)
