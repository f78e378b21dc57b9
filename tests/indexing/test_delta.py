"""Delta versions of the embedded index: updates of a large version write only the change.

Planted: a built version, then upserts (new points, moved vectors, changed payloads) and
deletes.  Every answer of the delta version (all planner paths, filters, exclusions,
batches, counts, retrieval, scroll) must equal numpy brute force over the points the
index should hold; the base version's files must not change (no copy, no write), and
compaction, pruning, rollback and integrity checks must keep working across layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexing.base import SearchFilter
from indexing.build import build_version, delete_points, open_store, rollback, upsert_points
from indexing.integrity import compute_checksums
from tests.indexing.conftest import indexed_vectors, make_config, make_points
from tests.indexing.test_contract import FILTERS, _reference

N, D = 600, 16


class Expected:
    """The points the index should hold, kept in numpy beside it."""

    def __init__(self, ids: np.ndarray, vecs: np.ndarray, pays: list[dict[str, Any]]) -> None:
        self.rows = {int(i): (v, p) for i, v, p in zip(ids, vecs, pays)}

    def upsert(self, ids: np.ndarray, vecs: np.ndarray, pays: list[dict[str, Any]]) -> None:
        self.rows.update({int(i): (v, p) for i, v, p in zip(ids, vecs, pays)})

    def delete(self, ids: list[int]) -> None:
        for i in ids:
            self.rows.pop(i, None)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        ids = np.array(sorted(self.rows), dtype=np.int64)
        return ids, np.stack([self.rows[i][0] for i in ids]), [self.rows[i][1] for i in ids]


def _store(tmp_path: Path, **kw: Any) -> Any:
    # full_scan_threshold_kb=1: base and delta shards get an HNSW graph (600 points of 16
    # floats are far below the default 1000 KB, where every search is a full scan)
    kw.setdefault("full_scan_threshold_kb", 1)
    return open_store(make_config("edge", tmp_path, delta_min_base=1, **kw))


def _updates(store: Any, exp: Expected) -> None:
    """New points, moved vectors, changed payloads, deletes: four delta versions."""
    new_ids, new_vecs, new_pay = make_points(20, D, seed=7, start=N + 1)
    upsert_points(store, new_ids, new_vecs, new_pay)
    exp.upsert(new_ids, new_vecs, new_pay)
    moved = np.arange(1, 41, dtype=np.int64)
    mv = np.random.default_rng(8).normal(size=(len(moved), D)).astype(np.float32)
    mp = [dict(exp.rows[int(i)][1]) for i in moved]
    for p in mp:  # moved items also change category and stock
        p["category_path"], p["in_stock"] = ["Beauty", "Beauty > Skin Care"], 1
    upsert_points(store, moved, mv, mp)
    exp.upsert(moved, mv, mp)
    gone = [3, 50, 51, N + 5, N + 6]  # base points, a moved one, new ones
    delete_points(store, gone)
    exp.delete(gone)
    again = new_ids[:3]  # points living in the delta, updated a second time
    av = -new_vecs[:3]
    upsert_points(store, again, av, new_pay[:3])
    exp.upsert(again, av, new_pay[:3])


@pytest.mark.parametrize(
    "planner",
    [
        {},
        {"exact_threshold": 1},  # unfiltered HNSW over-fetch + filter
        {"exact_threshold": 1, "postfilter_min_selectivity": 1.0},  # filtered HNSW
    ],
    ids=["default", "postfilter", "filtered-hnsw"],
)
@pytest.mark.slow
def test_delta_version_answers_like_bruteforce(tmp_path: Path, planner: dict[str, Any]) -> None:
    store = _store(tmp_path, delta_max_fraction=1.0, **planner)
    ids, vecs, pays = make_points(N, D)
    base = build_version(store, ids, vecs, pays, model_version="m").version
    base_files = compute_checksums(tmp_path / "index" / "versions" / base)
    exp = Expected(ids, vecs, pays)
    _updates(store, exp)
    live = store.alias_target("items")
    assert store.base_of(live) == base  # four updates, still one layer over the base
    assert compute_checksums(tmp_path / "index" / "versions" / base) == base_files
    layer = json.loads((tmp_path / "index" / "versions" / live / "base.json").read_text())
    assert layer["delta_points"] == 20 - 2 + 40 - 1  # new + moved, minus deleted ones
    e_ids, e_vecs, e_pays = exp.arrays()
    reader = store.open()
    assert reader.count() == len(e_ids) == store.manifest(live).count
    # both layers are searched through a graph: base (600) + delta (57 live points; the
    # delta's graph may still hold the vectors of points deleted from it)
    graph, points = indexed_vectors(reader)
    assert points == N + layer["delta_points"] and graph >= points
    qs = np.concatenate([np.random.default_rng(3).normal(size=(6, D)), e_vecs[:4]])
    qs = qs.astype(np.float32)
    for f in FILTERS:
        got = reader.search_batch(qs, 10, f, [[1, 2, N + 1]] * len(qs))
        for q, hits in zip(qs, got):
            want = _reference(e_ids, e_vecs, e_pays, q, 10, f.with_excluded([1, 2, N + 1]))
            assert [h.item_id for h in hits] == want
        assert (
            reader.count(f) == sum(f.matches(p, int(i)) for i, p in zip(e_ids, e_pays))
            or f.is_empty
        )
    single = [h.item_id for h in reader.search(qs[0], 10, FILTERS[2])]
    assert single == [h.item_id for h in reader.search_batch(qs[:1], 10, FILTERS[2])[0]]
    # retrieval sees the newest copy of every point and none of the deleted
    got = reader.get_vectors(e_ids.tolist())
    np.testing.assert_allclose(
        got, e_vecs / np.linalg.norm(e_vecs, axis=1, keepdims=True), atol=1e-5
    )
    assert reader.get_payloads([1])[0]["category_path"] == ["Beauty", "Beauty > Skin Care"]
    assert reader.existing_ids([3, 4, 50, N + 1, N + 5]) == {4, N + 1}
    seen = {int(i) for b, _, _ in store.scroll_all(live, with_vectors=False) for i in b}
    assert seen == set(e_ids.tolist())
    reader.close()
    store.close()


@pytest.mark.slow
def test_compaction_rollback_prune_and_integrity(tmp_path: Path) -> None:
    store = _store(tmp_path, delta_max_fraction=0.1, keep_versions=2)
    ids, vecs, pays = make_points(N, D)
    base = build_version(store, ids, vecs, pays, model_version="m").version
    exp = Expected(ids, vecs, pays)
    reader = store.open()
    versions, bases = [], []
    for k in range(4):  # 25 changed points each: after two, the delta outgrows 10% of 600
        up = np.arange(1 + 25 * k, 26 + 25 * k, dtype=np.int64)
        uv = np.random.default_rng(100 + k).normal(size=(25, D)).astype(np.float32)
        up_pays = [exp.rows[int(i)][1] for i in up]
        versions.append(upsert_points(store, up, uv, up_pays).version)
        bases.append(store.base_of(versions[-1]))
        exp.upsert(up, uv, up_pays)
    assert bases[:2] == [base, base] and bases[2] is None  # compacted into a full copy
    assert bases[3] == versions[2]  # the next delta extends the compacted version
    # pruning (keep 2) keeps the base the live delta version reads through
    kept = {m.version for m in store.versions("items")}
    assert kept == {versions[2], versions[3]}
    e_ids, e_vecs, e_pays = exp.arrays()
    q = e_vecs[7]
    want = _reference(e_ids, e_vecs, e_pays, q, 10, SearchFilter())
    assert [h.item_id for h in reader.search(q, 10)] == want
    # rollback to the compacted full version, then forward again
    rollback(store)
    assert reader.version == versions[2]
    rollback(store, to=versions[3])
    assert [h.item_id for h in reader.search(q, 10)] == want
    # damage to the BASE is found when checking the live (delta) version
    assert reader.check_integrity(full=True).ok
    shard = tmp_path / "index" / "versions" / versions[2] / "shard"
    victim = max((p for p in shard.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with victim.open("r+b") as fh:
        fh.seek(victim.stat().st_size // 2)
        fh.write(b"\xff" * 64)
    rep = store.check_integrity(versions[3])
    assert not rep.ok and any(p.startswith(f"base {versions[2]}") for p in rep.problems)
    reader.close()
    store.close()


def test_small_versions_are_copied_whole(tmp_path: Path) -> None:
    store = open_store(make_config("edge", tmp_path))  # default delta_min_base 50,000
    ids, vecs, pays = make_points(N, D)
    build_version(store, ids, vecs, pays, model_version="m")
    new_ids, new_vecs, new_pay = make_points(5, D, seed=4, start=N + 1)
    m = upsert_points(store, new_ids, new_vecs, new_pay)
    assert store.base_of(m.version) is None and m.count == N + 5
    store.close()


# A reader in another process: queries the alias in a loop, prints "version id,id,...",
# until the stop file exists (then one last query: it sees the last committed version);
# the deadline only guards against a test that never writes the stop file.
READER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import numpy as np
from indexing.base import IndexConfig
from indexing.build import open_store
store = open_store(IndexConfig(location={loc!r}))
reader = store.open()
q = np.array({q!r}, dtype=np.float32)
stop = Path({stop!r})

def answer():
    hits = reader.search(q, 10, with_payload=False)
    print(reader._tls.version, ",".join(str(h.item_id) for h in hits), flush=True)

print("ready", flush=True)
end = time.monotonic() + 300
while not stop.exists() and time.monotonic() < end:
    answer()
answer()
"""


@pytest.mark.slow
def test_reader_process_sees_whole_versions_only(tmp_path: Path) -> None:
    """Delta updates under a reader in another process: every answer is exactly one
    committed version's brute-force answer (never a half-applied update)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    store = _store(tmp_path, delta_max_fraction=1.0)
    ids, vecs, pays = make_points(N, D)
    first = build_version(store, ids, vecs, pays, model_version="m").version
    exp = Expected(ids, vecs, pays)
    q = vecs[10]
    answers: dict[str, list[int]] = {}

    def record(version: str) -> None:
        e_ids, e_vecs, e_pays = exp.arrays()
        answers[version] = _reference(e_ids, e_vecs, e_pays, q, 10, SearchFilter())

    record(first)
    stop = tmp_path / "stop"
    child = subprocess.Popen(
        [sys.executable, "-c", READER.format(
            root=str(root), loc=str(tmp_path / "index"), q=q.tolist(), stop=str(stop)
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    rng = np.random.default_rng(11)
    for k in range(4):  # each update moves 5 points right next to the query
        up = np.arange(100 + 5 * k, 105 + 5 * k, dtype=np.int64)
        uv = (q + rng.normal(scale=0.05, size=(5, D))).astype(np.float32)
        up_pays = [exp.rows[int(i)][1] for i in up]
        v = upsert_points(store, up, uv, up_pays).version
        exp.upsert(up, uv, up_pays)
        record(v)
    gone = [100, 105]
    v = delete_points(store, gone).version
    exp.delete(gone)
    record(v)
    stop.touch()
    out, _ = child.communicate(timeout=120)
    lines = [ln.split(" ") for ln in out.strip().splitlines()]
    seen = {ver for ver, _ in lines}
    assert len(lines) > 20 and v in seen  # the reader followed the alias to the last one
    for ver, got in lines:
        assert [int(i) for i in got.split(",")] == answers[ver], ver
    store.close()


def test_failed_delta_update_leaves_alias_and_base(tmp_path: Path) -> None:
    from indexing.base import VerificationError

    store = _store(tmp_path, full_scan_threshold_kb=1000)  # about counts: no graph needed
    ids, vecs, pays = make_points(N, D)
    base = build_version(store, ids, vecs, pays, model_version="m").version
    before = compute_checksums(tmp_path / "index" / "versions" / base)
    orig_seal = store.seal

    def lossy_seal(version: str) -> None:  # a delta that silently loses a point
        store.delete(version, [N + 2])
        orig_seal(version)

    store.seal = lossy_seal
    new_ids, new_vecs, new_pay = make_points(3, D, seed=9, start=N + 1)
    with pytest.raises(VerificationError, match=f"count {N + 2} != expected {N + 3}"):
        upsert_points(store, new_ids, new_vecs, new_pay)
    store.seal = orig_seal
    assert store.alias_target("items") == base
    assert store.incomplete_versions("items") == []
    assert compute_checksums(tmp_path / "index" / "versions" / base) == before
    m = upsert_points(store, new_ids, new_vecs, new_pay)  # the next one goes through
    assert store.base_of(m.version) == base and store.open().count() == N + 3
    store.close()
