"""``ecomrec index build|verify|upsert|delete|rollback|list``: the item/user vector index."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    from ecomrec.config import add_config_args

    p.add_argument(
        "--index", default=None, help="index directory (edge) or URL / :memory: (server)"
    )
    p.add_argument(
        "--backend",
        choices=["edge", "server"],
        default=None,
        help="default: edge, or server for URLs",
    )
    p.add_argument("--api-key", default=None, help="Qdrant server API key")
    p.add_argument("--alias", default=None, help="alias serving reads (default items)")
    add_config_args(
        p,
        tables="an [index] table of IndexConfig fields (a deployment file's [serve] and "
        "[refresh] tables are ignored)",
        example="index.hnsw_m=16",
        flags="--index, --backend, --api-key, --alias",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``index`` command and its actions."""
    p = sub.add_parser("index", help="build, verify, update and roll back the Qdrant vector index")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    b = isub.add_parser(
        "build", help="embed the catalogue, write a new version, verify, swap the alias"
    )
    _common(b)
    b.add_argument(
        "--model", default=None, help="training run directory (towers.inference.load_run)"
    )
    b.add_argument(
        "--dataset",
        default=None,
        help="catalogue, popularity and user sequences from this dataset folder (or name / "
        "contract file); the model must have been trained on it",
    )
    b.add_argument(
        "--data-dir", default=None, help="bundled datasets folder (default: $ECOMREC_DATA_DIR)"
    )
    b.add_argument(
        "--catalog", default=None, help="catalogue file (.parquet/.csv, canonical item columns)"
    )
    b.add_argument(
        "--vectors", default=None, help=".npy (N, D) vectors aligned with --catalog rows (no model)"
    )
    b.add_argument("--queries", default=None, help=".npy (Q, D) user vectors for the recall check")
    b.add_argument("--users", action="store_true", help="also build the user-vector collection")
    b.add_argument(
        "--no-text",
        action="store_true",
        help="leave out the catalogue's MiniLM text vectors (SearchProducts' collection, "
        "docs/complements.md); the service then searches them in memory from the text cache",
    )
    b.add_argument(
        "--user-payload",
        default=None,
        help=".parquet/.csv: user_id, segment, rfm_segment, churn_risk",
    )
    b.set_defaults(func=_build)

    v = isub.add_parser(
        "verify", help="recall@k of ANN vs exact and latency percentiles of the live version"
    )
    _common(v)
    v.add_argument(
        "--queries", default=None, help=".npy (Q, D) query vectors (default: stored item vectors)"
    )
    v.add_argument("--k", type=int, default=10, help="neighbours compared per query")
    v.add_argument("--ef", type=int, default=None, help="HNSW search width (default: config)")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(func=_verify)

    u = isub.add_parser("upsert", help="add or replace products (embedded by the item tower)")
    _common(u)
    u.add_argument(
        "--items",
        required=True,
        help="catalogue rows (.parquet/.csv): the data contract's columns (product_id, title, "
        "...) or the canonical ones (external_id, title, ...)",
    )
    u.add_argument(
        "--model",
        default=None,
        help="run directory the live version was built from (its item tower embeds the rows)",
    )
    u.add_argument(
        "--vectors", default=None, help=".npy (N, D) aligned with --items (instead of --model)"
    )
    u.add_argument(
        "--no-text",
        action="store_true",
        help="do not embed the rows' text for the text collection (the items then have no "
        "text vector there until the next build)",
    )
    u.set_defaults(func=_upsert)

    d = isub.add_parser("delete", help="remove products (idempotent)")
    _common(d)
    d.add_argument("--items", default=None, help="file with an external_id (or item_id) column")
    d.add_argument("--ids", default=None, help="comma-separated internal item ids")
    d.add_argument("--external-ids", default=None, help="comma-separated external ids")
    d.add_argument("--strict", action="store_true", help="fail on ids not in the index")
    d.set_defaults(func=_delete)

    r = isub.add_parser("rollback", help="point the alias at the previous (or a given) version")
    _common(r)
    r.add_argument("--to", default=None, help="version name (default: the one before the live one)")
    r.set_defaults(func=_rollback)

    ls = isub.add_parser("list", help="versions, the live one marked")
    _common(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)


# -- helpers -------------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> Any:
    """IndexConfig: ``[index]`` of --config < --set index.KEY=VALUE < the flags."""
    from ecomrec.config import DEPLOY_TABLES, read_config
    from indexing.base import IndexConfig

    src = read_config(args.config, getattr(args, "set", ()))
    src.check_tables(DEPLOY_TABLES)
    flags: dict[str, Any] = {
        "location": args.index,
        "backend": args.backend,
        "api_key": args.api_key,
        "alias": args.alias,
    }
    if args.index and args.backend is None and "backend" not in src.table("index"):
        flags["backend"] = "server" if args.index.startswith(("http://", "https://")) else "edge"
    return src.build(IndexConfig, "index", flags)


def _existing_store(cfg: Any) -> Any:
    """The store of an index that must already exist: a missing edge path is an error and
    nothing is created."""
    from ecomrec.errors import IndexUnavailableError
    from indexing.build import open_store

    if cfg.backend == "edge" and cfg.location != ":memory:" and not Path(cfg.location).exists():
        raise IndexUnavailableError(
            f"index {cfg.location} does not exist (nothing created): build one with "
            f"`ecomrec index build --index {cfg.location} ...`, or check --index"
        )
    return open_store(cfg)


def _read_frame(path: str) -> Any:
    import polars as pl

    from ecomrec.errors import DataError

    p = Path(path)
    if not p.exists():
        raise DataError("file does not exist", file=str(p))
    if p.suffix == ".parquet":
        return pl.read_parquet(p)
    if p.suffix in (".csv", ".tsv"):
        return pl.read_csv(
            p, separator="\t" if p.suffix == ".tsv" else ",", infer_schema_length=10000
        )
    raise DataError("expected a .parquet or .csv file", file=str(p))


def _load_npy(path: str) -> Any:
    import numpy as np

    from ecomrec.errors import DataError

    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read vectors: {e}", file=path) from e


def _print_manifest(m: Any) -> None:
    v = m.verify
    print(
        f"{m.alias} -> {m.version}: {m.count:,} points, dim {m.dim}, model {m.model_version}, "
        f"recall@{v.get('k')} {v.get('recall', float('nan')):.4f}, p50 {v.get('p50_ms', 0):.2f} ms, "
        f"p99 {v.get('p99_ms', 0):.2f} ms, built in {m.build_seconds:.1f}s"
    )


# -- handlers ------------------------------------------------------------------------------
def _build(args: argparse.Namespace) -> int:
    import numpy as np

    from ecomrec.errors import ConfigError, DataError
    from indexing.build import build_version, item_payloads, open_store, user_query_vectors

    cfg = _config(args)
    store = open_store(cfg)
    ds = None
    if args.dataset:
        from intake.loaders import load_dataset

        ds = load_dataset(args.dataset, args.data_dir)
    if args.catalog:
        items = _read_frame(args.catalog)
    elif ds is not None:
        items = ds.items
    else:
        raise ConfigError("give --catalog FILE or --dataset NAME")
    popularity = None
    queries = _load_npy(args.queries) if args.queries else None
    if args.model:
        from towers.inference import load_run

        model = load_run(args.model)
        if ds is not None:
            model.check_dataset(ds, "index build")
        else:
            _check_catalog_overlap(model, items, args.catalog)
        provenance = model.provenance()
        if ds is not None:
            provenance["dataset"] = ds.fingerprint()
        model_version, chash = model.model_version, model.config_hash
        ids, payloads = item_payloads(
            items, model_version, None, source=args.catalog or "catalogue"
        )
        log.info("embedding %d items with %s", items.height, args.model)
        vectors = np.concatenate(
            [model.embed_items(items[a : a + 4096]) for a in range(0, items.height, 4096)]
        )  # (N, D)
        if ds is not None:
            uq, users, inter = user_query_vectors(model, ds, cfg.verify_sample, cfg.seed)
            popularity = inter.item_counts()
            queries = uq if queries is None else queries
            ids, payloads = item_payloads(items, model_version, popularity)
    elif args.vectors:
        vectors = _load_npy(args.vectors)
        model_version, chash = Path(args.vectors).stem, ""
        provenance = {"model_version": model_version, "vectors": str(args.vectors)}
        if ds is not None:
            provenance["dataset"] = ds.fingerprint()
        ids, payloads = item_payloads(
            items, model_version, None, source=args.catalog or "catalogue"
        )
    else:
        raise ConfigError("give --model RUN_DIR or --vectors FILE.npy")
    if len(vectors) != items.height:
        raise DataError(
            f"{len(vectors)} vectors for {items.height} catalogue rows", file=args.vectors
        )
    if args.model:  # products the model never saw and has no content for: left out, counted
        from indexing.build import without_untrained

        ids, vectors, payloads, left_out = without_untrained(ids, vectors, payloads)
        provenance["left_out_no_vector"] = left_out
        if left_out:
            print(f"{left_out:,} catalogue products have no trained vector: left out of the index")
    text = None
    if not args.no_text:  # every catalogue product with text, trained vector or not
        from indexing.text_index import catalogue_text_points

        all_ids, all_payloads = item_payloads(
            items, model_version, popularity, source=args.catalog or "catalogue"
        )
        text = catalogue_text_points(items, all_ids, all_payloads)
    m = build_version(
        store,
        ids,
        vectors,
        payloads,
        model_version=model_version,
        config_hash=chash,
        queries=queries,
        progress=True,
        provenance=provenance,
        text=text,
    )
    _print_manifest(m)
    if args.users:
        if not args.model or ds is None:
            raise ConfigError("--users needs --model and --dataset")
        from indexing.users import build_user_index, user_payloads

        uvec, users, _ = user_query_vectors(model, ds, 10**9, cfg.seed)
        extra: dict[str, dict[int, Any]] = {"segment": {}, "rfm_segment": {}, "churn_risk": {}}
        if args.user_payload:
            up = _read_frame(args.user_payload)
            for col in extra:
                if col in up.columns:
                    extra[col] = dict(zip(up["user_id"].to_list(), up[col].to_list()))
        ext = [ds.users.to_external(int(u)) for u in users]
        pay = user_payloads(
            users,
            ext,
            segments=extra["segment"],
            rfm_segments=extra["rfm_segment"],
            churn_risk=extra["churn_risk"],
        )
        um = build_user_index(
            store, users, uvec, pay, model_version=model_version, config_hash=chash
        )
        _print_manifest(um)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from indexing.build import verify_version

    cfg = _config(args)
    store = _existing_store(cfg)
    live = store.alias_target(cfg.alias)
    if live is None:
        from ecomrec.errors import IndexUnavailableError

        raise IndexUnavailableError(f"index alias {cfg.alias!r} does not exist in {cfg.location}")
    manifest = next(m for m in store.versions(cfg.alias) if m.version == live)
    check = getattr(store, "check_integrity", None)  # embedded backend: file checksums
    if check is not None:
        integ = check(live)
        if not integ.ok:
            print(
                f"{cfg.alias} -> {live}: DAMAGED, {len(integ.problems)} file(s) do not match "
                f"the checksums written at build time:",
                file=sys.stderr,
            )
            for prob in integ.problems[:20]:
                print(f"  {prob}", file=sys.stderr)
            return 1
        print(
            f"{cfg.alias} -> {live}: checksums OK ({integ.files} files, {integ.bytes / 1e6:.1f} MB)"
            if integ.has_checksums
            else f"{cfg.alias} -> {live}: no checksums (built before they existed)",
            file=sys.stderr if args.json else sys.stdout,
        )
    queries = _load_npy(args.queries) if args.queries else None
    rep = verify_version(
        store, live, expected_count=manifest.count, queries=queries, k=args.k, hnsw_ef=args.ef
    )
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(
            f"{cfg.alias} -> {live}: recall@{rep.k} {rep.recall:.4f} over {rep.n_queries} queries "
            f"(ef {rep.hnsw_ef}), count {rep.count:,}/{rep.expected_count:,}, "
            f"p50 {rep.p50_ms:.2f} ms, p99 {rep.p99_ms:.2f} ms: {'OK' if rep.ok else 'FAIL ' + rep.reason}"
        )
    return 0 if rep.ok else 1


def _check_catalog_overlap(model: Any, items: Any, source: str | None) -> None:
    """A catalogue file none of whose products the model knows is another shop's."""
    import polars as pl

    from ecomrec.errors import MismatchError

    ext = items["external_id"].cast(pl.Utf8).to_list() if "external_id" in items.columns else []
    known = sum(model.item_ids.get(e) is not None for e in ext)
    if ext and known == 0:
        raise MismatchError(
            f"index build: none of the {len(ext):,} products in {source} is in the catalogue "
            f"run {model.run_dir} was trained on ({len(model.item_ids):,} products): another "
            "shop's catalogue or model. Pass the matching --model, or --dataset to check fully"
        )


def _check_upsert_model(model: Any, live: Any, location: str) -> None:
    """Upserted vectors must come from the model (and catalogue) the live version was built
    from, else they land in another vector space or overwrite other products."""
    from ecomrec.errors import MismatchError

    prov = getattr(live, "provenance", None) or {}
    want_items = prov.get("model_items")
    if want_items and want_items != model.items_hash:
        raise MismatchError(
            f"index upsert: index {location} ({live.version}) was built from model "
            f"{live.model_version} over another catalogue (items fingerprint {want_items}) "
            f"than run {model.run_dir} ({model.items_hash}): nothing written. Use that model, "
            "or build a new version with `ecomrec index build`"
        )
    if live.model_version != model.model_version:
        raise MismatchError(
            f"index upsert: index {location} ({live.version}) holds vectors of model "
            f"{live.model_version}, not of {model.model_version} (run {model.run_dir}): its "
            "vectors would not be comparable; nothing written. Build a new version with "
            "`ecomrec index build --model ...` instead"
        )


def _external_map(store: Any, alias: str) -> dict[str, int]:
    live = store.alias_target(alias)
    out: dict[str, int] = {}
    if live is None:
        return out
    for ids, _, pays in store.scroll_all(live, with_vectors=False):
        for i, p in zip(ids.tolist(), pays):
            out[str(p.get("external_id"))] = int(i)
    return out


def _upsert(args: argparse.Namespace) -> int:
    import numpy as np
    import polars as pl

    from ecomrec.errors import ConfigError, DataError
    from indexing.build import CATALOG_COLUMNS, _live, item_payloads, upsert_points
    from intake.schema import require_columns

    cfg = _config(args)
    store = _existing_store(cfg)
    live = _live(store, cfg.alias)
    items = _read_frame(args.items)
    if "product_id" in items.columns and "external_id" not in items.columns:
        from intake.loaders.contract import read_catalogue
        from intake.schema import ITEMS_SCHEMA

        items = read_catalogue(args.items)  # a catalogue in the data contract (docs/data.md)
        items = items.with_columns(
            [
                pl.lit(None, dtype=t).alias(c)
                for c, t in ITEMS_SCHEMA.items()
                if c not in items.columns and c != "item_id"
            ]
        )
    require_columns(items, [c for c in CATALOG_COLUMNS if c != "item_id"], file=args.items)
    # Ids: the index's id for a known external id, else the model's, else a new one.
    ext_map = _external_map(store, cfg.alias)
    model = None
    if args.model:
        from towers.inference import load_run

        model = load_run(args.model)
        _check_upsert_model(model, live, cfg.location)
    next_id = max([*ext_map.values(), len(model.item_ids) if model else 0]) + 1
    new_ids = []
    for e in items["external_id"].cast(pl.Utf8).to_list():
        i = ext_map.get(e) or (model.item_ids.get(e) if model else None)
        if i is None:
            i, next_id = next_id, next_id + 1
        new_ids.append(i)
    items = items.with_columns(pl.Series("item_id", new_ids, dtype=pl.Int32))
    if model is not None:
        vectors = model.embed_items(items)  # (N, D)
        mv = model.model_version
    elif args.vectors:
        vectors = _load_npy(args.vectors)
        mv = live.model_version
    else:
        raise ConfigError("give --model RUN_DIR or --vectors FILE.npy")
    if len(vectors) != items.height:
        raise DataError(f"{len(vectors)} vectors for {items.height} rows", file=args.vectors)
    ids, payloads = item_payloads(items, mv, None, source=args.items)
    # keep the stored popularity of products that already exist
    old = {i for i in ids.tolist() if i in set(ext_map.values())}
    if old and "popularity" not in items.columns:
        reader = store.open(alias=cfg.alias)
        try:
            pops = dict(
                zip(sorted(old), [p.get("popularity", 0) for p in reader.get_payloads(sorted(old))])
            )
        finally:
            reader.close()
        for i, p in zip(ids.tolist(), payloads):
            if i in pops:
                p["popularity"] = pops[i]
    text = None
    if not args.no_text:
        from indexing.text_index import catalogue_text_points

        text = catalogue_text_points(items, ids, payloads)
    m = upsert_points(store, ids, np.asarray(vectors), payloads, text=text)
    print(f"upserted {len(ids)} item(s) ({len(ids) - len(old)} new)")
    _print_manifest(m)
    return 0


def _delete(args: argparse.Namespace) -> int:
    import polars as pl

    from ecomrec.errors import ConfigError, NotFoundError
    from indexing.build import delete_points

    cfg = _config(args)
    store = _existing_store(cfg)
    ids: list[int] = []
    externals: list[str] = []
    if args.ids:
        ids += [int(x) for x in args.ids.split(",") if x.strip()]
    if args.external_ids:
        externals += [x.strip() for x in args.external_ids.split(",") if x.strip()]
    if args.items:
        f = _read_frame(args.items)
        if "external_id" in f.columns:
            externals += f["external_id"].cast(pl.Utf8).to_list()
        elif "item_id" in f.columns:
            ids += [int(x) for x in f["item_id"].to_list()]
        else:
            raise ConfigError(f"{args.items}: needs an external_id or item_id column")
    if externals:
        ext_map = _external_map(store, cfg.alias)
        unknown = [e for e in externals if e not in ext_map]
        if unknown and args.strict:
            raise NotFoundError(f"external id(s) {unknown[:10]} are not in index {cfg.alias!r}")
        ids += [ext_map[e] for e in externals if e in ext_map]
    if not ids and not externals:
        raise ConfigError("give --ids, --external-ids or --items")
    m = delete_points(store, ids, missing_ok=not args.strict)
    _print_manifest(m)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from indexing.build import rollback

    cfg = _config(args)
    m = rollback(_existing_store(cfg), cfg.alias, args.to)
    print(f"{cfg.alias} -> {m.version} ({m.count:,} points, model {m.model_version})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from indexing.build import list_versions

    cfg = _config(args)
    rows = list_versions(_existing_store(cfg), cfg.alias)
    if args.json:
        print(json.dumps([{**json.loads(m.to_json()), "live": live} for m, live in rows], indent=2))
        return 0
    if not rows:
        print(f"no versions of {cfg.alias!r} in {cfg.location}")
    for m, live in rows:
        print(
            f"{'*' if live else ' '} {m.version}  {m.count:>9,} pts  dim {m.dim}  model {m.model_version}  "
            f"recall@{m.verify.get('k')} {m.verify.get('recall', float('nan')):.4f}  {m.build_seconds:.1f}s"
        )
    return 0


def build_index(
    index: str, model: str, dataset: str, data_dir: str | None = None, alias: str | None = None
) -> int:
    """``ecomrec index build --index I --model M --dataset D`` as a function (``serve
    --build-index`` uses it): a new verified version from the run, swapped in."""
    argv = ["index", "build", "--index", index, "--model", model, "--dataset", dataset]
    argv += ["--data-dir", data_dir] if data_dir else []
    argv += ["--alias", alias] if alias else []
    parser = argparse.ArgumentParser(prog="ecomrec")
    register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(argv)  # every option of `index build` with its default
    return _build(ns)
