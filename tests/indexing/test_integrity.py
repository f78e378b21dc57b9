"""Checksums of index versions: written at commit, checked at open and by `index verify`.

Damage is planted in the real qdrant-edge files: the vector file truncated (the engine's
next read of a truncated memory map is a SIGBUS) or overwritten with random bytes of the
same size (garbage scores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexing.base import IndexConfig
from indexing.build import build_version, open_index, open_store
from indexing.integrity import CHECKSUMS_FILE, IndexCorruptError, check_version_dir

DIM = 16
N = 150


def _build(root: Path) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(N, DIM)).astype(np.float32)
    ids = np.arange(1, N + 1)
    pays = [{"external_id": f"SKU{i:05d}", "category": "A", "in_stock": 1} for i in ids]
    store = open_store(IndexConfig(location=str(root), hnsw_m=16, hnsw_ef_construct=64))
    try:
        m = build_version(store, ids, vecs, pays, model_version="m")
    finally:
        store.close()
    return m.version, vecs


def _vector_file(root: Path, version: str) -> Path:
    files = sorted((root / "versions" / version).rglob("vector_storage/vectors/chunk_*.mmap"))
    assert files, "no vector file found: the engine's layout changed"
    return files[0]


def damage(path: Path, how: str) -> None:
    """Truncate a file or overwrite it in place with random bytes of the same size."""
    if how == "truncate":
        os.truncate(path, 0)
    else:
        n = path.stat().st_size
        rng = np.random.default_rng(7)
        with path.open("r+b") as fh:
            for a in range(0, n, 1 << 20):
                fh.write(rng.bytes(min(1 << 20, n - a)))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ecomrec", "index", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_checksums_written_and_stable_across_opens(tmp_path: Path) -> None:
    version, vecs = _build(tmp_path)
    vdir = tmp_path / "versions" / version
    recorded = json.loads((vdir / CHECKSUMS_FILE).read_text())["files"]
    assert any("vector_storage" in k for k in recorded) and "meta.json" in recorded
    for _ in range(2):  # loading rewrites file times, never contents
        idx = open_index(IndexConfig(location=str(tmp_path)))
        hits = idx.search(vecs[4], 3, with_payload=False)
        assert hits[0].item_id == 5 and abs(hits[0].score - 1.0) < 1e-4
        idx.close()
        rep = check_version_dir(vdir, full=True)
        assert rep.ok and rep.has_checksums and rep.files == len(recorded), rep.problems


@pytest.mark.parametrize("how", ["truncate", "scramble"])
def test_damaged_version_refused_at_open_and_by_verify(tmp_path: Path, how: str) -> None:
    version, vecs = _build(tmp_path)
    ok = _cli("verify", "--index", str(tmp_path))
    assert ok.returncode == 0 and "checksums OK" in ok.stdout, ok.stderr
    vf = _vector_file(tmp_path, version)
    damage(vf, how)
    bad = _cli("verify", "--index", str(tmp_path))
    assert bad.returncode == 1 and "DAMAGED" in bad.stderr and vf.name in bad.stderr
    assert "Traceback" not in bad.stderr
    for local_copy in (False, True):
        idx = open_index(IndexConfig(location=str(tmp_path)), local_copy=local_copy)
        try:
            with pytest.raises(IndexCorruptError, match=vf.name):
                idx.search(vecs[0], 3)
            with pytest.raises(IndexCorruptError):
                idx.get_vectors([1])
        finally:
            idx.close()


def test_local_copy_survives_damage_to_published_files(tmp_path: Path) -> None:
    """Truncating the live vector file under a reader without a copy is a SIGBUS (the
    issue's crash); with ``local_copy`` the reader keeps answering from its checked copy."""
    version, vecs = _build(tmp_path)
    idx = open_index(IndexConfig(location=str(tmp_path)), local_copy=str(tmp_path / "copies"))
    try:
        before = [(h.item_id, h.score) for h in idx.search(vecs[9], 5, with_payload=False)]
        damage(_vector_file(tmp_path, version), "truncate")
        after = [(h.item_id, h.score) for h in idx.search(vecs[9], 5, with_payload=False)]
        assert after == before and before[0][0] == 10
        assert np.allclose(idx.get_vectors([10])[0], vecs[9] / np.linalg.norm(vecs[9]), atol=1e-5)
        rep = idx.check_integrity(full=False)  # type: ignore[attr-defined]
        assert not rep.ok and "size 0" in rep.problems[0]
    finally:
        idx.close()
    assert not list((tmp_path / "copies").iterdir()), "private copies left behind"


def test_scrambled_while_open_without_copy_raises_not_garbage(tmp_path: Path) -> None:
    """Random bytes under a reader serving the published files: the impossible scores are
    an IndexCorruptError (callers degrade), never an answer."""
    version, vecs = _build(tmp_path)
    idx = open_index(IndexConfig(location=str(tmp_path)))
    try:
        assert idx.search(vecs[0], 3, with_payload=False)[0].item_id == 1
        damage(_vector_file(tmp_path, version), "scramble")
        with pytest.raises(IndexCorruptError):
            idx.search(vecs[0], 3, with_payload=False)
        with pytest.raises(IndexCorruptError):
            idx.get_vectors([1, 2, 3])
        # the periodic check finds it too and quarantines the version
        rep = idx.check_integrity(full=True)  # type: ignore[attr-defined]
        assert not rep.ok and "checksum" in rep.problems[0]
        with pytest.raises(IndexCorruptError):
            idx.count()
    finally:
        idx.close()
