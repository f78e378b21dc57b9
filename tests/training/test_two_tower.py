"""Two-tower training: planted answers, retriever protocol, resume, fine-tuning modes, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from towers.inference import load_run
from towers.sequences import Interactions
from training.contrastive import ContrastiveConfig, prepare_finetune, trainable_parameters
from training.evaluation import evaluate
from training.retriever import Retriever
from training.splits import leave_one_out
from training.trainer import Trainer, fast_evaluate, load_run_config
from training.two_tower import TwoTowerRetriever

N = 24


def planted_shop(n_users: int = 240, seed: int = 0) -> tuple[Interactions, pl.DataFrame]:
    """Every user walks the catalogue in steps of +1 (cyclic): the next item is planted."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start = int(rng.integers(1, N + 1))
        length = int(rng.integers(5, 10))
        seqs.append([(start - 1 + k) % N + 1 for k in range(length)])
    inter = Interactions.from_lists(seqs, N)
    items = pl.DataFrame(
        {
            "item_id": np.arange(1, N + 1, dtype=np.int32),
            "external_id": [f"sku{i}" for i in range(1, N + 1)],
            "title": [f"item number {i}" for i in range(1, N + 1)],
        }
    )
    return inter, items


def tiny_config(**over: object) -> object:
    base: dict[str, object] = {
        "threads": 1,
        "tensorboard": False,
        "progress": False,
        "item": {"dim": 16, "use_text": False},
        "user": {
            "hidden": 16,
            "n_heads": 2,
            "n_layers": 1,
            "max_len": 10,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
        "pretrain": {
            "epochs": 12,
            "batch_size": 32,
            "lr": 0.01,
            "patience": 12,
            "temperature": 0.1,
        },
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}  # type: ignore[dict-item]
        else:
            base[k] = v
    return load_run_config(None, **base)


@pytest.mark.slow
def test_planted_next_item_is_learned_and_run_dir_is_complete(tmp_path: Path) -> None:
    inter, items = planted_shop()
    split = leave_one_out(inter)
    r = TwoTowerRetriever(items, items["external_id"].to_list(), tiny_config(), tmp_path)  # type: ignore[arg-type]
    assert isinstance(r, Retriever) and r.refit_on_train_valid is False
    r.fit(split.train, split.valid)
    m = evaluate(r.score, split.test, split.train_valid, ks=(1, 5))
    assert m["recall@1"] > 0.9, m
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["pretrain"]["best_ndcg"] > 0.8
    assert (tmp_path / "model.pt").exists() and (tmp_path / "pretrain.pt").exists()
    assert not (tmp_path / "last.pt").exists()
    # the loaded run scores exactly like the in-memory model
    tm = load_run(tmp_path)
    users = split.test.users[:16]
    enc = tm.user_encoder()
    from towers.sequences import batch_for_users

    u = enc.encode(batch_for_users(split.train_valid, users, tm.max_len))
    s = u @ tm.item_vectors().T
    np.testing.assert_allclose(s, r.score(users, split.train_valid), atol=1e-5)
    # retriever save -> load round trip
    r.save(tmp_path / "saved")
    r2 = TwoTowerRetriever.load(tmp_path / "saved")
    np.testing.assert_allclose(
        r2.score(users, split.train_valid), r.score(users, split.train_valid), atol=1e-6
    )


def test_fast_evaluate_matches_reference_evaluate(tmp_path: Path) -> None:
    inter, items = planted_shop(seed=1)
    split = leave_one_out(inter)
    cfg = tiny_config(pretrain={"epochs": 1})
    r = TwoTowerRetriever(items, items["external_id"].to_list(), cfg, tmp_path)  # type: ignore[arg-type]
    r.fit(split.train, split.valid)
    assert r.model is not None
    ref = evaluate(r.score, split.valid, split.train, ks=(10, 20))
    fast = fast_evaluate(r.model, split.valid, split.train, 10)
    for k in ("ndcg@10", "recall@10", "recall@20"):
        assert abs(ref[k] - fast[k]) < 1e-9


@pytest.mark.slow
def test_resume_after_interruption_continues_from_last_epoch(tmp_path: Path) -> None:
    inter, items = planted_shop(seed=2)
    split = leave_one_out(inter)
    cfg = tiny_config(pretrain={"epochs": 4, "patience": 10})
    full = TwoTowerRetriever(items, items["external_id"].to_list(), cfg, tmp_path / "a")  # type: ignore[arg-type]
    full.fit(split.train, split.valid)
    # simulate a run killed after 2 epochs: train 2 epochs of the same 4-epoch schedule
    tr = Trainer(cfg, items, items["external_id"].to_list(), tmp_path / "b")  # type: ignore[arg-type]
    stopper = {"n": 0}
    orig = tr.evaluate

    def counting_eval(*a: object) -> dict[str, float]:
        stopper["n"] += 1
        if stopper["n"] == 3:
            raise KeyboardInterrupt
        return orig(*a)  # type: ignore[arg-type]

    tr.evaluate = counting_eval  # type: ignore[method-assign,assignment]
    with pytest.raises(KeyboardInterrupt):
        tr.fit(split.train, split.valid)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert state["epoch"] == 1
    resumed = TwoTowerRetriever(items, items["external_id"].to_list(), cfg, tmp_path / "b")  # type: ignore[arg-type]
    resumed.fit(split.train, split.valid)
    h_full = [h["ndcg@10"] for h in full.manifest["stages"]["pretrain"]["history"]]
    h_res = [h["ndcg@10"] for h in resumed.manifest["stages"]["pretrain"]["history"]]
    assert len(h_res) == 4
    np.testing.assert_allclose(h_res, h_full, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora", "frozen"])
def test_finetune_modes_train_and_merge(tmp_path: Path, mode: str) -> None:
    inter, items = planted_shop(seed=3)
    split = leave_one_out(inter)
    cfg = tiny_config(
        pretrain={"epochs": 2},
        user={"n_layers": 2},
        contrastive={
            "enabled": True,
            "mode": mode,
            "epochs": 2,
            "n_negatives": 8,
            "lr": 0.005,
            "lora_r": 4,
            "frozen_layers": 1,
        },
    )
    r = TwoTowerRetriever(items, items["external_id"].to_list(), cfg, tmp_path)  # type: ignore[arg-type]
    r.fit(split.train, split.valid)
    st = r.manifest["stages"]
    total = st["pretrain"]["trainable_params"]
    tuned = st["contrastive"]["trainable_params"]
    if mode == "full":
        assert tuned == total
    else:
        assert tuned < total
    # the saved model is a plain TwoTower again (LoRA merged), loadable and scoring
    tm = load_run(tmp_path)
    assert tm.item_vectors().shape == (N + 1, 16)
    assert np.isfinite(r.score(split.test.users[:4], split.train_valid)).all()


def test_lora_trains_only_adapters_and_saved_modules() -> None:
    from towers.item_tower import ItemTowerConfig, build_item_features
    from towers.model import TwoTower
    from towers.user_tower import UserTowerConfig

    _, items = planted_shop()
    m = TwoTower(
        ItemTowerConfig(dim=16, use_text=False),
        UserTowerConfig(hidden=16, n_heads=2),
        N,
        build_item_features(items, N, None),
    )
    total = trainable_parameters(m)
    peft_m = prepare_finetune(m, ContrastiveConfig(enabled=True, mode="lora", lora_r=2))
    names = [n for n, p in peft_m.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("id_emb" in n for n in names)
    assert not any("intermediate" in n for n in names)
    assert trainable_parameters(peft_m) < total


def _planted_dataset_dir(tmp_path: Path) -> Path:
    from intake.dataset import Dataset, IdMap
    from intake.schema import DropReport

    inter, items = planted_shop(n_users=80, seed=4)
    users = inter.user_of_row()
    ev = pl.DataFrame(
        {
            "user_id": users.astype(np.int32),
            "item_id": inter.items,
            "ts": inter.ts,
            "event_type": ["purchase"] * len(users),
            "quantity": np.ones(len(users), np.int32),
            "price": [None] * len(users),
            "order": np.arange(len(users)),
        }
    )
    ds = Dataset(
        "planted",
        ev,
        items,
        IdMap([f"u{i}" for i in range(1, 81)]),
        IdMap(items["external_id"].to_list()),
        DropReport("test"),
    )
    ds.save(tmp_path / "ds")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "threads = 1\ntensorboard = false\nprogress = false\n[item]\ndim = 8\nuse_text = false\n"
        "[user]\nhidden = 8\nn_heads = 2\nn_layers = 1\nmax_len = 8\n[pretrain]\nepochs = 1\n"
    )
    return cfg


@pytest.mark.slow
def test_cli_train_writes_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.cli import main

    cfg = _planted_dataset_dir(tmp_path)
    rc = main(
        [
            "train",
            "--dataset",
            str(tmp_path / "ds"),
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "pretrain.lr=0.005",
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res["test"]) >= {"ndcg@10", "recall@10"} and res["valid"]["users"] == 80


def test_test_only_reads_the_test_of_a_no_test_run_once(tmp_path: Path) -> None:
    """Choose on validation (--no-test), then read test once: same numbers as a direct
    evaluation of the saved model; a second read is refused."""
    from ecomrec.errors import ModelError
    from intake.loaders import load_dataset
    from training.cli import main, make_split

    cfg = _planted_dataset_dir(tmp_path)
    args = ["train", "--dataset", str(tmp_path / "ds"), "--config", str(cfg)]
    args += ["--out", str(tmp_path / "run"), "--set", "fallback.enabled=false"]
    assert main([*args, "--no-test"]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "test" not in res
    assert main([*args, "--test-only"]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    split = make_split(load_dataset(str(tmp_path / "ds")), "loo-file")
    r = TwoTowerRetriever.load(tmp_path / "run")
    want = evaluate(r.score, split.test, split.train_valid, ks=(5, 10, 20))
    assert res["test"]["ndcg@10"] == pytest.approx(want["ndcg@10"])
    assert res["test"]["users"] == want["users"] == 80
    with pytest.raises(ModelError, match="read once"):
        main([*args, "--test-only"])


def test_split_windows_cuts_long_histories_into_max_len_windows() -> None:
    from training.trainer import split_windows

    inter = Interactions.from_lists([list(range(1, 12)), [3, 4], [5]], 20)
    w = split_windows(inter, 4)
    got = [w.seq(u).tolist() for u in range(1, w.n_users + 1)]
    # newest window first per user; a 1-event remainder is dropped (nothing to predict)
    assert got == [[8, 9, 10, 11], [4, 5, 6, 7], [1, 2, 3], [3, 4]]
    assert w.ts[0] == inter.ts[7]


_HEAP_PROBE = """
import ctypes, os, sys
from training.memory import bound_heap_growth, release_free_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss_kb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
bound_heap_growth()
assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"  # set before any oneDNN op
MB = 1 << 20
# fixed thresholds (whatever the environment's MALLOC_* or dynamic threshold say): 4 MB
# blocks come from the heap, and glibc never trims the heap top on its own
libc.mallopt(-3, 16 * MB)  # M_MMAP_THRESHOLD
libc.mallopt(-1, 512 * MB)  # M_TRIM_THRESHOLD
base = rss_kb()
blocks = [libc.malloc(4 * MB) for _ in range(4)]  # below the lifted threshold: heap blocks
for b in blocks:
    ctypes.memset(b, 1, 4 * MB)
for b in blocks[:-1]:  # the newest stays: the freed ones are not at the top of the heap
    libc.free(b)
if sys.argv[1] == "trim":
    release_free_memory()
print(rss_kb() - base)
"""


def test_release_free_memory_returns_freed_heap_blocks_to_the_os() -> None:
    """Variable-size training tensors must not pile up in glibc's heap (peak RSS limit)."""
    import subprocess
    import sys

    def kept_mb(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1]) / 1024

    assert kept_mb("keep") >= 15  # glibc keeps the 3 freed 4 MB blocks resident
    assert kept_mb("trim") <= 6  # only the live block remains
