"""Distributed two-tower training: PyTorch DistributedDataParallel over N processes.

``ecomrec train ... --nproc N`` re-runs itself under ``torchrun`` (``torch.distributed.run
--standalone``); every process then finds ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in
its environment, joins the process group (gloo on CPU, nccl on CUDA, one GPU per
process) and trains a :class:`DistributedTrainer`:

- **data sharded by user**: every process plans the same epoch (same seed) and takes
  its share of the users of each global batch (``batch[rank::world]``; batches are
  length-sorted, so the shares have similar numbers of events). The global batch is
  ``batch_size`` as in a single-process run; each process encodes ``batch_size / N``
  users per step.
- **gradients**: the loss goes through a DDP-wrapped module, so ``backward`` averages
  the gradients of the processes (the mean of the per-process mean losses: equal to the
  single-process loss when the shares have equal numbers of loss positions, close
  otherwise). Optimizer, schedule and clipping then run identically everywhere.
- **checkpoints and resume**: only rank 0 writes (``model.pt``, ``pretrain.pt``,
  ``last.pt``, ``manifest.json``, TensorBoard); every process resumes from the same
  ``last.pt``, so a restarted N-process run continues where it stopped.
- **validation**: rank 0 evaluates (full ranking) and broadcasts the metrics, so early
  stopping decides the same on every process.

Launch by hand with ``torchrun --standalone --nproc-per-node N -m ecomrec train ...``
(or on several machines with ``--nnodes`` and a rendezvous endpoint).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ecomrec.errors import ConfigError
from training.contrastive import ContrastiveConfig
from training.pretrain import PretrainConfig
from training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (from its environment)."""

    rank: int
    world_size: int
    local_rank: int

    @staticmethod
    def from_env() -> DistEnv | None:
        """The torchrun variables, or None outside a multi-process job."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return DistEnv(
            rank=int(os.environ["RANK"]),
            world_size=world,
            local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
        )


def backend_for(device: str) -> str:
    """``nccl`` when this job trains on CUDA, else ``gloo``."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if use_cuda else "gloo"


def init_process_group(env: DistEnv, device: str = "auto") -> None:
    """Join the job's process group (idempotent); binds one GPU per process on CUDA."""
    if dist.is_initialized():
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    log.info("process %d/%d joined (%s)", env.rank, env.world_size, backend)


def is_distributed() -> bool:
    """Whether this process is part of an initialised multi-process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process of the job (a no-op outside one)."""
    if is_distributed():
        dist.barrier()


def is_main_process() -> bool:
    """True outside a distributed job and on rank 0 inside one."""
    return not is_distributed() or dist.get_rank() == 0


class _LossModule(nn.Module):
    """The training loss as a module, so DDP sees the forward pass it must synchronise."""

    def __init__(self, trainer: DistributedTrainer, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self._trainer = [trainer]  # in a list: not a submodule, not in the state dict

    def forward(
        self,
        stage: str,
        scfg: PretrainConfig | ContrastiveConfig,
        batch: dict[str, torch.Tensor],
        log_pop: torch.Tensor,
        gen: torch.Generator,
    ) -> torch.Tensor:
        return Trainer._loss(self._trainer[0], stage, self.module, scfg, batch, log_pop, gen)


def shard_batches(plan: list[np.ndarray], rank: int, world: int) -> list[np.ndarray]:
    """This rank's users of every global batch: ``batch[rank::world]``.

    Every rank gets the same number of steps (DDP needs that). A batch with fewer users
    than processes gives the ranks left empty its whole batch again: their gradient is
    that batch's, so the average stays the single-process gradient.
    """
    out = []
    for b in plan:
        part = b[rank::world]
        out.append(part if len(part) else b)
    return out


class DistributedTrainer(Trainer):
    """A :class:`Trainer` that runs as one process of a DDP job (see the module doc)."""

    # The constructor is Trainer's (one signature for both); this hook runs at its end.
    def _join_process_group(self) -> None:
        if not is_distributed():
            raise ConfigError("DistributedTrainer needs an initialised process group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0  # only rank 0 writes files
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._ddp: DistributedDataParallel | None = None
        self._ddp_of: nn.Module | None = None

    def _shard_plan(self, plan: list[np.ndarray]) -> list[np.ndarray]:
        return shard_batches(plan, self.rank, self.world_size)

    def _loss(
        self,
        stage: str,
        module: nn.Module,
        scfg: PretrainConfig | ContrastiveConfig,
        batch: dict[str, torch.Tensor],
        log_pop: torch.Tensor,
        gen: torch.Generator,
    ) -> torch.Tensor:
        if self._ddp is None or self._ddp_of is not module:  # a new stage: wrap its module
            ids = [self.device.index] if self.device.type == "cuda" else None
            # some parameters get no gradient in a stage (frozen layers, the [MASK] slot of
            # a causal tower): DDP must look for them instead of waiting forever
            self._ddp = DistributedDataParallel(
                _LossModule(self, module), device_ids=ids, find_unused_parameters=True
            )
            self._ddp_of = module
        out: torch.Tensor = self._ddp(stage, scfg, batch, log_pop, gen)
        return out

    def _step_loss(self, loss: torch.Tensor) -> float:
        t = loss.detach().float().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t) / self.world_size

    def evaluate(self, model: Any, valid: Any, history: Any) -> dict[str, float]:
        box: list[Any] = [super().evaluate(model, valid, history) if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return dict(box[0])


def trainer_class() -> type[Trainer]:
    """:class:`DistributedTrainer` inside a multi-process job, else :class:`Trainer` (both
    take Trainer's constructor arguments)."""
    return DistributedTrainer if is_distributed() else Trainer


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that runs ``ecomrec <argv>`` as ``nproc`` local processes under torchrun."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "ecomrec",
        *argv,
    ]


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``ecomrec <argv>`` under torchrun with ``nproc`` processes; returns its exit code.

    Each process gets ``OMP_NUM_THREADS=1`` unless set (torchrun's own default too).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = torchrun_command(nproc, argv)
    log.info("launching %s", " ".join(cmd))
    return subprocess.call(cmd, env=env)
