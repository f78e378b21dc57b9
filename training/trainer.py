"""Two-tower training loop: stage 1 pretraining, optional stage 2 contrastive fine-tuning.

AdamW, linear warmup then cosine decay, gradient clipping, early stopping on the
validation NDCG@10 (full ranking, never test), fixed seeds, tqdm progress, TensorBoard
scalars, CUDA with bf16 autocast when present. A run directory holds:

- ``model.pt``     the best checkpoint over both stages (what :func:`towers.inference.load_run` opens)
- ``pretrain.pt``  the best stage-1 checkpoint (stage 2 starts from it)
- ``last.pt``      the resume state (weights, optimizer, scheduler, epoch, early-stopping state)
- ``manifest.json`` configs, per-epoch validation metrics, timings, peak memory, parameters
- ``tb/``          TensorBoard scalars

Batches hold users of similar length (shuffled, then sorted inside chunks) and are
padded to their own longest sequence; the loss only sees real positions.

Debugging aid: with ``$ECOMREC_BATCH_LOG`` set to a folder, every process appends one JSON
line per training step to ``<folder>/rank<R>.jsonl`` (stage, epoch, step, the user ids of
its batch rows, the logged loss); tests use it to check that DDP ranks share each global
batch without overlap.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ecomrec.config import builtin_config, config_hash, from_dict, load_toml, merge, to_dict
from ecomrec.errors import ConfigError
from towers.inference import MANIFEST_FILE, MODEL_FILE, batch_tensors
from towers.item_tower import (
    ItemTowerConfig,
    adapt_to_catalogue,
    build_item_features,
    content_features,
)
from towers.model import TwoTower, load_checkpoint, save_checkpoint
from towers.sequences import Interactions, batch_for_users
from towers.text_encoder import catalogue_text_embeddings
from towers.user_tower import UserTowerConfig
from training.basket import BasketTrainConfig
from training.contrastive import (
    ContrastiveConfig,
    base_model,
    finish_finetune,
    prepare_finetune,
    trainable_parameters,
)
from training.memory import (
    TRIM_EVERY_STEPS,
    bound_heap_growth,
    peak_rss_mb,
    release_free_memory,
)
from training.pretrain import PretrainConfig, log_popularity, masked_item_loss, next_item_loss
from training.splits import Targets

log = logging.getLogger(__name__)

#: Environment variable naming a folder for the per-step batch log (see the module doc).
BATCH_LOG_ENV = "ECOMREC_BATCH_LOG"


@dataclass(frozen=True)
class FallbackConfig:
    """Which baselines compete with the tower on validation (``[fallback]`` in the run TOML)."""

    enabled: bool = True
    baselines: tuple[str, ...] = ("als", "ease")
    als_factors: int = 128
    als_alphas: tuple[float, ...] = (10.0, 40.0)  # grid, regularization 1.0
    als_regularization: float = 1.0
    ease_l2: tuple[float, ...] = (250.0, 1000.0)  # grid
    ease_rank: int = 256  # served rank of the EASE matrix (truncated SVD)
    ease_max_items: int = 40_000  # larger catalogues skip EASE (dense N x N inverse)
    max_len: int = 200  # newest history events a baseline reads per user


@dataclass(frozen=True)
class NoContentConfig:
    """Settings applied when the catalogue has no product content (id-only item tower).

    Id embeddings start from nothing (no text to lean on) and keep improving after the
    text model's epoch budget (Beauty ids only: validation NDCG still rising at epoch 10
    of 10), so they get a longer budget; early stopping on validation picks the epoch.
    ``None`` keeps the ``[pretrain]`` / ``[user]`` value.
    """

    epochs: int | None = None  # stage-1 epoch budget (cosine schedule length)
    patience: int | None = None
    dropout: float | None = None  # user-tower hidden and attention dropout


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; saved in every checkpoint and the manifest."""

    item: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    user: UserTowerConfig = field(default_factory=UserTowerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    # baselines compared with the tower on validation by `ecomrec train` (training.fallback)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    no_content: NoContentConfig = field(default_factory=NoContentConfig)
    # the basket tower (training.basket), the tower of transaction logs (training.protocol)
    basket: BasketTrainConfig = field(default_factory=BasketTrainConfig)
    seed: int = 42
    threads: int = 2  # torch CPU threads (0 = leave torch's default)
    device: str = "auto"  # auto | cpu | cuda
    # bf16 autocast for training steps: "auto" = on CUDA and on CPUs with avx512_bf16/AMX
    # (about 3x faster matmuls there); evaluation always runs in float32
    autocast: Literal["auto", "bf16", "off"] = "auto"
    # users scored per validation batch: (batch x catalogue) float32 scores + the encoder's
    # activations; 512 keeps Beauty's validation under +0.25 GB (2048: +0.45 GB)
    eval_batch_size: int = 512
    length_buckets: int = 64  # batches sorted by length inside chunks of this many batches
    max_tokens: int = 2048  # split batches with more events than this (bounds peak memory); 0 = off
    tensorboard: bool = True
    progress: bool = True
    # start from the weights of this checkpoint (e.g. another run's pretrain.pt); same
    # model shape required. With pretrain.enabled = false this is "stage 2 only".
    init_checkpoint: str = ""
    # train on every window of max_len events of long histories (not only the most recent
    # one): more training positions for shops with long histories (Online Retail)
    train_windows: bool = False
    # early stopping and every choice on validation use a seeded sample of the users
    # (this fraction, at least valid_users_min of them; leave-one-out splits only); the
    # other users' validation items are trained on (training.splits.sample_validation).
    # 1.0 = the classic protocol (every user validates, no one trains on validation)
    valid_users: float = 1.0
    valid_users_min: int = 2000

    def __post_init__(self) -> None:
        if not (self.pretrain.enabled or self.contrastive.enabled):
            raise ConfigError("enable at least one of pretrain / contrastive")
        if self.pretrain.objective == "masked" and self.user.attention != "bidirectional":
            raise ConfigError("pretrain.objective='masked' needs user.attention='bidirectional'")
        if self.pretrain.objective == "next" and self.user.attention != "causal":
            raise ConfigError("pretrain.objective='next' needs user.attention='causal'")
        if not 0.0 < self.valid_users <= 1.0:
            raise ConfigError(f"valid_users must be in (0, 1], got {self.valid_users}")


def default_config_path() -> Path:
    """The default two-tower run config (the built-in ``default``,
    ``ecomrec/configs/towers/default.toml``)."""
    return builtin_config("towers", "default")


def load_run_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """RunConfig from a TOML file (or defaults), with nested ``overrides`` tables merged."""
    data = merge(load_toml(path) if path is not None else {}, overrides)
    source = f"config file {path}" if path is not None else "defaults"
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def _device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matmuls (avx512_bf16 or AMX); Linux only."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def split_windows(inter: Interactions, max_len: int) -> Interactions:
    """Each user's sequence cut into consecutive windows of at most ``max_len`` events
    (the newest window ends at the newest event); every window becomes its own row."""
    seqs: list[tuple[int, int]] = []
    for u in range(1, inter.n_users + 1):
        lo, hi = int(inter.indptr[u]), int(inter.indptr[u + 1])
        end = hi
        while end - lo >= 2:
            seqs.append((max(lo, end - max_len), end))
            end -= max_len
    idx = np.concatenate([np.arange(a, b) for a, b in seqs]) if seqs else np.zeros(0, np.int64)
    lens = np.array([b - a for a, b in seqs], np.int64)
    indptr = np.zeros(len(seqs) + 2, np.int64)
    indptr[2:] = np.cumsum(lens)
    return Interactions(
        len(seqs), inter.n_items, indptr, inter.items[idx], inter.ts[idx], inter.event_type[idx]
    )


def plan_batches(
    inter: Interactions,
    users: np.ndarray,
    batch_size: int,
    max_len: int,
    rng: np.random.Generator,
    chunk_batches: int,
    max_tokens: int = 0,
) -> list[np.ndarray]:
    """Shuffled batches of users of similar length (sorted inside chunks of batches).

    With ``max_tokens`` a batch whose events exceed it is split, which bounds the
    (positions x catalogue) logits of the long-sequence batches (peak memory).
    """
    perm = rng.permutation(users)
    lens = np.minimum(inter.lengths()[perm], max_len)
    chunk = batch_size * max(1, chunk_batches)
    batches: list[np.ndarray] = []
    for s in range(0, len(perm), chunk):
        order = np.argsort(lens[s : s + chunk], kind="stable")
        part, plen = perm[s : s + chunk][order], lens[s : s + chunk][order]
        for i in range(0, len(part), batch_size):
            b, bl = part[i : i + batch_size], plen[i : i + batch_size]
            n_split = math.ceil(int(bl.sum()) / max_tokens) if max_tokens > 0 else 1
            batches += [x for x in np.array_split(b, max(1, n_split)) if len(x)]
    return [batches[i] for i in rng.permutation(len(batches))]


def iter_batches(
    inter: Interactions, batches: list[np.ndarray], max_len: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Tensors of planned batches, each padded to its own longest sequence."""
    for b in batches:
        yield batch_tensors(batch_for_users(inter, b, max_len), device)


def history_index(history: Interactions, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, items) of every history event of ``users`` (row = position in ``users``)."""
    starts = history.indptr[users]
    lens = history.indptr[users + 1] - starts
    total = int(lens.sum())
    rows = np.repeat(np.arange(len(users)), lens)
    offs = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(starts, lens)
    return rows, history.items[offs].astype(np.int64)


@torch.no_grad()
def fast_evaluate(
    model: TwoTower,
    targets: Targets,
    history: Interactions,
    max_len: int,
    batch_size: int = 2048,
    ks: tuple[int, ...] = (10, 20),
) -> dict[str, float]:
    """Same full-ranking metrics as :func:`training.evaluation.evaluate` (history excluded),
    computed in torch without the per-user Python loop; used for early stopping."""
    from training.evaluation import metrics_from_topk

    was = model.training
    model.eval()
    table = model.item_table()
    vn = model.item_vectors(table)  # (N+1, D)
    kmax = max(ks)
    tops = []
    for s in range(0, len(targets), batch_size):
        u = targets.users[s : s + batch_size]
        t = batch_tensors(batch_for_users(history, u, max_len), vn.device)
        uv = model.encode(t["items"], t["event_type"], t["gap"], t["lengths"], table=table)
        sc = uv.float() @ vn.T  # (b, N+1)
        sc[:, 0] = -torch.inf
        rows, cols = history_index(history, u)
        sc[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        tops.append(torch.topk(sc, kmax, dim=1).indices.cpu().numpy())
    model.train(was)
    top = np.concatenate(tops) if tops else np.zeros((0, kmax), np.int64)
    out = metrics_from_topk(top, targets, ks, history.n_items)
    out["users"] = float(len(targets))
    return out


@dataclass
class StageResult:
    best_ndcg: float
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int
    seconds: float
    seconds_to_best: float
    trainable_params: int
    history: list[dict[str, float]]


class Trainer:
    """Trains a :class:`TwoTower` on one split's training sequences."""

    def __init__(
        self,
        cfg: RunConfig,
        items: pl.DataFrame,
        item_ids: list[str],
        run_dir: str | Path,
        text_cache_dir: str | Path | None = None,
        t_start: float | None = None,
        init_model: TwoTower | None = None,
        vocab: dict[str, list[str]] | None = None,
    ) -> None:
        """``init_model`` (warm start, lifecycle refresh): train this model instance instead
        of building a fresh one (its ``known`` mask is kept); ``vocab`` is then its
        brand/category vocabulary, saved in the checkpoints."""
        # a catalogue without product text (no items file, --no-text) -> id-only item tower
        item_cfg = adapt_to_catalogue(cfg.item, items)
        if item_cfg != cfg.item:
            log.info(
                "catalogue has no %s: item features %s",
                ", ".join(
                    sorted(set(content_features(cfg.item)) - set(content_features(item_cfg)))
                ),
                content_features(item_cfg),
            )
            cfg = replace(cfg, item=item_cfg)
        if not (item_cfg.use_text or item_cfg.use_brand or item_cfg.use_category):
            nc = cfg.no_content
            pre, user = cfg.pretrain, cfg.user
            if nc.epochs is not None:
                pre = replace(pre, epochs=nc.epochs)
            if nc.patience is not None:
                pre = replace(pre, patience=nc.patience)
            if nc.dropout is not None:
                user = replace(user, dropout=nc.dropout, attention_dropout=nc.dropout)
            cfg = replace(cfg, pretrain=pre, user=user)
            log.info("id-only item tower: [no_content] settings %s", nc)
        self.cfg = cfg
        bound_heap_growth()
        self.items = items
        self.item_ids = list(item_ids)
        self.n_items = len(self.item_ids)
        self.run_dir = Path(run_dir)
        self.text_cache_dir = text_cache_dir
        self.device = _device(cfg)
        self.amp = cfg.autocast == "bf16" or (
            cfg.autocast == "auto" and (self.device.type == "cuda" or cpu_has_bf16())
        )
        self.writer: Any = None
        self.t_start = t_start if t_start is not None else time.perf_counter()
        self.manifest: dict[str, Any] = {}
        self._vocab_cache: dict[str, list[str]] | None = vocab
        self.init_model = init_model
        self._fit_on: Interactions | None = None
        # every step's loss (averaged over processes in a DDP job) is kept for parity checks
        self.step_losses: list[float] = []
        self._join_process_group()

    def _join_process_group(self) -> None:
        """This process's place in a DDP job (training/distributed.py overrides it): here
        the only process, so the one that writes files."""
        self.is_main = True

    # --- model ---------------------------------------------------------------------
    def build_model(self, train: Interactions) -> TwoTower:
        cfg = self.cfg
        text = None
        if cfg.item.use_text:
            t0 = time.perf_counter()
            raw = catalogue_text_embeddings(
                self.items, cfg.item.text_fields, cfg.item.text_max_tokens, self.text_cache_dir
            )
            text = raw
            self.manifest["text_seconds"] = time.perf_counter() - t0
        feats = build_item_features(self.items, self.n_items, text)
        torch.manual_seed(cfg.seed)
        model = TwoTower(cfg.item, cfg.user, self.n_items, feats)
        model.item_tower.set_known(train.item_counts())
        return model.to(self.device)

    def _meta(self, stage: str, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "run_config": to_dict(self.cfg),
            "config_hash": config_hash(self.cfg),
            "model_version": f"{self.run_dir.name}-{config_hash(self.cfg)}",
            "stage": stage,
            "epoch": epoch,
            "valid_metrics": metrics,
        }

    # --- training ------------------------------------------------------------------
    def fit(
        self, train: Interactions, valid: Targets | None, resume: bool = True
    ) -> tuple[TwoTower, dict[str, Any]]:
        """Run the enabled stages; returns the best model (by validation NDCG@10) and the manifest."""
        cfg = self.cfg
        if train.n_items != self.n_items:
            raise ConfigError(f"interactions have {train.n_items} items, catalogue {self.n_items}")
        if cfg.threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        if self.init_model is not None:  # warm start: weights and `known` come with the model
            model = self.init_model.to(self.device)
        else:
            model = self.build_model(train)
        if cfg.init_checkpoint:
            init, _ = load_checkpoint(cfg.init_checkpoint)
            model.load_state_dict(init.model.state_dict())
            model.item_tower.set_known(train.item_counts())
            log.info("initialised from %s", cfg.init_checkpoint)
        self.manifest.update(
            {
                "config_hash": config_hash(cfg),
                "run_config": to_dict(cfg),
                "n_items": self.n_items,
                "item_features": content_features(cfg.item),
            }
        )
        log_pop = log_popularity(train.item_counts(), self.device)
        fit_on = split_windows(train, cfg.user.max_len) if cfg.train_windows else train
        self._fit_on = fit_on  # training rows; validation still reads each user's `train`
        users = np.flatnonzero(fit_on.lengths() >= 2).astype(np.int64)
        resume_state = self._resume_state() if resume else None
        results: dict[str, StageResult] = {}
        best_overall = -1.0
        if cfg.pretrain.enabled:
            done = resume_state is not None and resume_state.get("stage") != "pretrain"
            if done and (self.run_dir / "pretrain.pt").exists():
                ck, _ = load_checkpoint(self.run_dir / "pretrain.pt")
                model.load_state_dict(ck.model.state_dict())
                results["pretrain"] = StageResult(**resume_state["results"]["pretrain"])  # type: ignore[index]
            else:
                res = self._stage(
                    "pretrain", model, cfg.pretrain, train, valid, users, log_pop, resume_state
                )
                results["pretrain"] = res
            best_overall = results["pretrain"].best_ndcg
            save_path = self.run_dir / MODEL_FILE
            self._save(save_path, model, "pretrain", results["pretrain"])
        if cfg.contrastive.enabled:
            rs = (
                resume_state
                if resume_state and resume_state.get("stage") == "contrastive"
                else None
            )
            before = copy.deepcopy(model.state_dict())
            res = self._stage(
                "contrastive", model, cfg.contrastive, train, valid, users, log_pop, rs
            )
            results["contrastive"] = res
            if res.best_ndcg > best_overall:
                best_overall = res.best_ndcg
                self._save(self.run_dir / MODEL_FILE, model, "contrastive", res)
            else:
                log.info(
                    "stage 2 did not beat stage 1 on validation (%.4f <= %.4f): keeping stage 1",
                    res.best_ndcg,
                    best_overall,
                )
                model.load_state_dict(before)
        self.manifest["stages"] = {k: vars(v) for k, v in results.items()}
        self.manifest["best_valid_ndcg@10"] = best_overall
        self.manifest["chosen_stage"] = max(results, key=lambda k: results[k].best_ndcg)
        self.manifest["total_seconds"] = time.perf_counter() - self.t_start
        self.manifest["peak_rss_mb"] = peak_rss_mb()
        self.manifest["model_version"] = f"{self.run_dir.name}-{config_hash(cfg)}"
        if self.is_main:
            (self.run_dir / MANIFEST_FILE).write_text(
                json.dumps(self.manifest, indent=2, default=float)
            )
            (self.run_dir / "last.pt").unlink(missing_ok=True)
        if self.writer is not None:
            self.writer.close()
        return model, self.manifest

    def _resume_state(self) -> dict[str, Any] | None:
        p = self.run_dir / "last.pt"
        if not p.exists():
            return None
        state = torch.load(p, map_location="cpu", weights_only=False)
        if state.get("config_hash") != config_hash(self.cfg):
            log.warning("last.pt was written by another config; starting over")
            return None
        log.info("resuming %s at epoch %d", state["stage"], state["epoch"] + 1)
        return dict(state)

    def _save(self, path: Path, model: TwoTower, stage: str, res: StageResult) -> None:
        if not self.is_main:
            return
        save_checkpoint(
            path,
            model,
            self.item_ids,
            self._vocab(),
            self._meta(stage, res.best_epoch, res.best_metrics),
        )

    def _vocab(self) -> dict[str, list[str]]:
        if self._vocab_cache is None:
            self._vocab_cache = build_item_features(self.items, self.n_items, None).vocab
        return self._vocab_cache

    def evaluate(self, model: TwoTower, valid: Targets, history: Interactions) -> dict[str, float]:
        return fast_evaluate(model, valid, history, self.cfg.user.max_len, self.cfg.eval_batch_size)

    def _stage(
        self,
        stage: str,
        model: TwoTower,
        scfg: PretrainConfig | ContrastiveConfig,
        train: Interactions,
        valid: Targets | None,
        users: np.ndarray,
        log_pop: torch.Tensor,
        resume_state: dict[str, Any] | None,
    ) -> StageResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        fit_on = self._fit_on if self._fit_on is not None else train
        module = prepare_finetune(model, scfg) if isinstance(scfg, ContrastiveConfig) else model
        params = [p for p in module.parameters() if p.requires_grad]
        n_train = trainable_parameters(module)
        opt = torch.optim.AdamW(params, lr=scfg.lr, weight_decay=scfg.weight_decay)
        steps_per_epoch = len(
            plan_batches(
                fit_on,
                users,
                scfg.batch_size,
                cfg.user.max_len,
                np.random.default_rng(cfg.seed),
                cfg.length_buckets,
                cfg.max_tokens,
            )
        )  # varies by a few batches between epochs when max_tokens splits batches
        total = max(1, steps_per_epoch * scfg.epochs)
        warmup = int(scfg.warmup_ratio * total)
        # Linear warmup, then cosine decay to min_lr_ratio x lr (transformers' schedule).
        sched = get_cosine_with_min_lr_schedule_with_warmup(
            opt, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=scfg.min_lr_ratio
        )
        best_ndcg, best_epoch, bad, start_epoch = -1.0, -1, 0, 0
        best_metrics: dict[str, float] = {}
        history: list[dict[str, float]] = []
        best_state: dict[str, torch.Tensor] | None = None
        seconds_to_best = 0.0
        resumable = not (isinstance(scfg, ContrastiveConfig) and scfg.mode == "lora")
        if resume_state is not None and resume_state.get("stage") == stage and resumable:
            module.load_state_dict(resume_state["model"])
            opt.load_state_dict(resume_state["optimizer"])
            sched.load_state_dict(resume_state["scheduler"])
            best_ndcg, best_epoch, bad = (
                resume_state["best"],
                resume_state["best_epoch"],
                resume_state["bad"],
            )
            best_metrics, history = resume_state["best_metrics"], resume_state["history"]
            best_state = resume_state["best_state"]
            start_epoch = resume_state["epoch"] + 1
            seconds_to_best = resume_state.get("seconds_to_best", 0.0)
        gen = torch.Generator(device=self.device)
        global_step = start_epoch * steps_per_epoch
        for epoch in range(start_epoch, scfg.epochs):
            rng = np.random.default_rng(cfg.seed * 1000 + epoch)
            gen.manual_seed(cfg.seed * 1000 + epoch)
            torch.manual_seed(cfg.seed * 1000 + epoch)
            module.train()
            te = time.perf_counter()
            plan = plan_batches(
                fit_on,
                users,
                scfg.batch_size,
                cfg.user.max_len,
                rng,
                cfg.length_buckets,
                cfg.max_tokens,
            )
            plan = self._shard_plan(plan)
            losses = []
            bar = tqdm(
                iter_batches(fit_on, plan, cfg.user.max_len, self.device),
                total=steps_per_epoch,
                disable=not cfg.progress,
                leave=False,
                desc=f"{stage} {epoch + 1}/{scfg.epochs}",
            )
            batch_log = os.environ.get(BATCH_LOG_ENV)
            for step, batch in enumerate(bar):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    loss = self._loss(stage, module, scfg, batch, log_pop, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if scfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, scfg.grad_clip)
                opt.step()
                sched.step()
                losses.append(self._step_loss(loss))
                self.step_losses.append(losses[-1])
                if batch_log:
                    self._log_batch(Path(batch_log), stage, epoch, step, plan[step], losses[-1])
                global_step += 1
                if len(losses) % TRIM_EVERY_STEPS == 0:
                    release_free_memory()
                if len(losses) % 20 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            train_s = time.perf_counter() - te
            release_free_memory()
            if valid is not None and len(valid):
                m = self.evaluate(base_model(module), valid, train)
            else:  # no validation: the last epoch is the best
                m = {"ndcg@10": float(epoch), "recall@10": 0.0}
            rec = {
                "epoch": epoch,
                "loss": float(np.mean(losses)) if losses else 0.0,
                "train_seconds": train_s,
                **{k: float(v) for k, v in m.items()},
            }
            history.append(rec)
            log.info(
                "%s epoch %d loss %.4f valid ndcg@10 %.4f recall@10 %.4f (%.1fs)",
                stage,
                epoch + 1,
                rec["loss"],
                m["ndcg@10"],
                m["recall@10"],
                train_s,
            )
            if self.writer is not None:
                self.writer.add_scalar(f"{stage}/loss", rec["loss"], global_step)
                self.writer.add_scalar(f"{stage}/valid_ndcg@10", m["ndcg@10"], global_step)
                self.writer.add_scalar(f"{stage}/valid_recall@10", m["recall@10"], global_step)
                self.writer.add_scalar(f"{stage}/lr", sched.get_last_lr()[0], global_step)
            if m["ndcg@10"] > best_ndcg:
                best_ndcg, best_epoch, bad, best_metrics = m["ndcg@10"], epoch, 0, dict(m)
                best_state = self._plain_state(module, scfg)
                seconds_to_best = time.perf_counter() - self.t_start
                if stage == "pretrain" and self.is_main:
                    save_checkpoint(
                        self.run_dir / "pretrain.pt",
                        base_model(module),
                        self.item_ids,
                        self._vocab(),
                        self._meta(stage, epoch, m),
                    )
            else:
                bad += 1
            if resumable and self.is_main:
                _save_atomic(
                    {
                        "stage": stage,
                        "epoch": epoch,
                        "model": module.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "best": best_ndcg,
                        "best_epoch": best_epoch,
                        "bad": bad,
                        "best_metrics": best_metrics,
                        "history": history,
                        "best_state": best_state,
                        "seconds_to_best": seconds_to_best,
                        "config_hash": config_hash(cfg),
                        "results": {},
                    },
                    self.run_dir / "last.pt",
                )
            if bad >= scfg.patience:
                log.info(
                    "%s: early stop after epoch %d (best epoch %d)",
                    stage,
                    epoch + 1,
                    best_epoch + 1,
                )
                break
        final = finish_finetune(module, scfg) if isinstance(scfg, ContrastiveConfig) else model
        if best_state is not None:
            final.load_state_dict(best_state)
        if final is not model:
            model.load_state_dict(final.state_dict())
        res = StageResult(
            best_ndcg=best_ndcg,
            best_epoch=best_epoch,
            best_metrics=best_metrics,
            epochs_run=len(history),
            seconds=time.perf_counter() - t0,
            seconds_to_best=seconds_to_best,
            trainable_params=n_train,
            history=history,
        )
        if stage == "pretrain" and resumable and self.is_main:
            # mark stage 1 as done for a resumed run
            _save_atomic(
                {
                    "stage": "contrastive",
                    "epoch": -1,
                    "config_hash": config_hash(cfg),
                    "results": {"pretrain": vars(res)},
                },
                self.run_dir / "last.pt",
            )
        return res

    def _log_batch(
        self, folder: Path, stage: str, epoch: int, step: int, users: np.ndarray, loss: float
    ) -> None:
        """One line of the ``$ECOMREC_BATCH_LOG`` debugging log (see the module doc)."""
        rank = int(getattr(self, "rank", 0))
        folder.mkdir(parents=True, exist_ok=True)
        line = {"stage": stage, "epoch": epoch, "step": step, "users": users.tolist()}
        with open(folder / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({**line, "loss": loss}) + "\n")

    def _shard_plan(self, plan: list[np.ndarray]) -> list[np.ndarray]:
        """This process's part of an epoch's batches (all of them here; see distributed.py)."""
        return plan

    def _step_loss(self, loss: torch.Tensor) -> float:
        """The loss of one step as logged (this process's; averaged in distributed.py)."""
        return float(loss.detach())

    @staticmethod
    def _plain_state(module: torch.nn.Module, scfg: Any) -> dict[str, torch.Tensor]:
        """State dict of the plain TwoTower (LoRA merged into a copy)."""
        if isinstance(scfg, ContrastiveConfig) and scfg.mode == "lora":
            merged = copy.deepcopy(module).merge_and_unload()  # type: ignore[operator]
            return {k: v.detach().clone() for k, v in merged.state_dict().items()}
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def _loss(
        self,
        stage: str,
        module: torch.nn.Module,
        scfg: PretrainConfig | ContrastiveConfig,
        batch: dict[str, torch.Tensor],
        log_pop: torch.Tensor,
        gen: torch.Generator,
    ) -> torch.Tensor:
        model = base_model(module)
        if isinstance(scfg, PretrainConfig) and scfg.objective == "masked":
            return masked_item_loss(model, batch, scfg, gen, log_pop)
        if isinstance(scfg, ContrastiveConfig) and model.user_tower.bidirectional:
            return _bidirectional_contrastive(model, batch, scfg, log_pop, gen)
        positions = scfg.positions if isinstance(scfg, ContrastiveConfig) else "all"
        return next_item_loss(model, batch, scfg, log_pop, positions, gen)


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary sibling, then rename: a process killed mid-write
    leaves the previous file (a resume never reads half a ``last.pt``)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _bidirectional_contrastive(
    model: TwoTower,
    batch: dict[str, torch.Tensor],
    cfg: ContrastiveConfig,
    log_pop: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Two-tower pairs for a bidirectional tower: the prefix without its newest item -> that item."""
    from training.pretrain import softmax_loss

    items, lengths = batch["items"], batch["lengths"]
    keep = lengths >= 2
    items, lengths = items[keep], lengths[keep] - 1
    y = items.gather(1, lengths.unsqueeze(1)).squeeze(1)  # (B,)
    pos = torch.arange(items.shape[1], device=items.device).unsqueeze(0)
    real = pos < lengths.unsqueeze(1)
    items = items * real
    et = batch["event_type"][keep] * real
    gap = batch["gap"][keep] * real
    table = model.item_table()
    u = model.encode(items, et, gap, lengths, table=table)  # (B, D)
    return softmax_loss(u, y, model.item_vectors(table), cfg, log_pop, gen)
