"""``ecomrec serve | recommend``: the service and its command-line client.

``ecomrec export triton`` is in :mod:`serving.export_cli`, ``ecomrec demo`` in
:mod:`ecomrec.demo`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``recommend``."""
    from ecomrec.config import add_config_args
    from intake.loaders.registry import DATASET_HELP

    s = sub.add_parser("serve", help="run the gRPC Recommend service")
    s.add_argument("--model", required=True, help="training run directory")
    s.add_argument("--dataset", required=True, help="histories and catalogue: " + DATASET_HELP)
    s.add_argument(
        "--data-dir", default=None, help="bundled datasets folder (default: $ECOMREC_DATA_DIR)"
    )
    s.add_argument(
        "--index",
        default=None,
        help="embedded index directory (IndexConfig.location); default: the [index] table of "
        "--config (e.g. a Qdrant server URL, deploy/), else artifacts/index",
    )
    s.add_argument(
        "--index-alias", default=None, help="index alias the service reads (default: items)"
    )
    s.add_argument(
        "--build-index",
        action="store_true",
        help="first build a new index version from --model and --dataset into --index "
        "(what `ecomrec index build` does), then serve it",
    )
    s.add_argument(
        "--segments",
        default=None,
        help="segments.parquet (user_id, rfm_segment, ...) or an `ecomrec segments export --raw-ids` directory",
    )
    add_config_args(
        s,
        tables="a [serve] table (ServeConfig) and optionally [index] (IndexConfig), e.g. "
        "ecomrec/configs/serving/serve.toml or deploy/config/serve.toml; default: built-in "
        "ServeConfig, re-rank policies from the package",
        example="serve.workers=4",
        flags="--index, --index-alias, --host, --port, --metrics-*, --encoder, --triton-url",
    )
    s.add_argument("--host", default=None, help="bind address (default: the config's, 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="gRPC port (default: the config's)")
    s.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus port (default: the config's)"
    )
    s.add_argument(
        "--metrics-host",
        default=None,
        help="Prometheus host, plain HTTP (default: the config's, 127.0.0.1)",
    )
    s.add_argument(
        "--encoder",
        choices=["inprocess", "onnx", "triton"],
        default=None,
        help="user-tower runtime (default: the config's, inprocess)",
    )
    s.add_argument("--triton-url", default=None, help="Triton gRPC URL for --encoder triton")
    s.add_argument(
        "--start-triton",
        default=None,
        metavar="REPO",
        help="start a local pytriton server for this exported repository (dev)",
    )
    s.add_argument("--json-logs", action="store_true", help="log JSON lines")
    s.add_argument(
        "--follow-refresh",
        default=None,
        metavar="STATE",
        help="state directory of `ecomrec refresh` (INDEX.refresh): serve its live deployment "
        "and reload every promotion or rollback without a restart (manifest polled, and on "
        "SIGHUP)",
    )
    s.add_argument(
        "--follow-interval",
        type=float,
        default=2.0,
        help="seconds between checks of the refresh manifest (with --follow-refresh)",
    )
    s.set_defaults(func=_serve)

    r = sub.add_parser("recommend", help="call a running service (client)")
    r.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the service")
    r.add_argument("--user", default="", help="external user id")
    r.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="ITEM[:TYPE]",
        help="recent event (repeatable)",
    )
    r.add_argument("-k", type=int, default=10, help="number of recommendations")
    r.add_argument(
        "--category", action="append", default=[], help="only this category (repeatable)"
    )
    r.add_argument("--price-min", type=float, default=None, help="lowest price")
    r.add_argument("--price-max", type=float, default=None, help="highest price")
    r.add_argument("--api-key", default=None, help="default: first key of $ECOMREC_API_KEYS")
    r.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
    r.add_argument(
        "--mode",
        choices=["explore", "buy-again"],
        default="explore",
        help="explore: products not bought yet; buy-again: the customer's own products "
        "(recency-weighted purchase frequency) blended with new ones, marked BUY_AGAIN",
    )
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=_recommend)

    from serving.discovery_cli import register as register_discovery

    register_discovery(sub)  # `basket`, `search`


def _serve(args: argparse.Namespace) -> int:
    import time

    from ecomrec.config import read_config
    from indexing.base import IndexConfig
    from indexing.build import open_index
    from intake.loaders import load_dataset
    from serving.assemble import build_recommender, load_parts
    from serving.config import index_config, serve_config
    from serving.observability import Metrics, configure_logging
    from serving.segments import TableSegmentLookup
    from serving.server import install_signal_handlers, start_server
    from serving.service import RecommendServicer

    if args.json_logs:
        configure_logging("INFO", json_logs=True)
    import torch

    # many RPC threads share 2 cores: one intra-op thread each avoids oversubscription
    torch.set_num_threads(1)
    triton_proc = None
    if args.start_triton:
        from serving.triton import TritonProcess

        triton_proc = TritonProcess(args.start_triton).start()
        args.triton_url = triton_proc.url
        args.encoder = args.encoder or "triton"
    src = read_config(args.config, args.set)
    cfg = serve_config(
        src,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        encoder=args.encoder,
        triton_url=args.triton_url,
    )
    metrics = Metrics()
    servicer = RecommendServicer(None, cfg, metrics)
    try:
        handle = start_server(cfg, servicer, metrics)  # health NOT_SERVING while loading
    except Exception:
        if triton_proc is not None:
            triton_proc.stop()
        raise
    done = install_signal_handlers(handle, cfg.grace_s, cfg.shutdown_delay_s)
    index = None
    reloader = None
    router = None
    try:
        t0 = time.perf_counter()
        ds = load_dataset(args.dataset, args.data_dir)
        parts = load_parts(args.model, ds)
        icfg = index_config(src, location=args.index, alias=args.index_alias)
        if icfg is None:
            icfg = IndexConfig(
                location=args.index or "artifacts/index", alias=args.index_alias or "items"
            )
        if args.build_index:
            from indexing.cli import build_index

            build_index(icfg.location, args.model, args.dataset, args.data_dir, icfg.alias)
        local_copy: bool | str = (cfg.index_copy_dir or True) if cfg.index_local_copy else False
        require_index_dir(icfg)  # a typo'd --index is refused, nothing is created there
        index = open_index(icfg, local_copy=local_copy)
        # an index built from another model refuses at once (no service answering INTERNAL)
        check_index_matches_model(index, parts.model, icfg.location)
        segments = None
        if args.segments:
            seg_path = Path(args.segments)
            segments = (
                TableSegmentLookup.from_marketing_export(seg_path, ds.users)
                if seg_path.is_dir()
                else TableSegmentLookup.load(seg_path)
            )
        engine = build_recommender(cfg, parts, index, segments, metrics=metrics)
        servicer.attach(engine)
        # opens and checks the live index version; a failure is logged as an ERROR
        # ("index could not be opened: ...") and health stays NOT_SERVING
        problem, _ = handle.check_index()
        if args.follow_refresh:
            reloader = _follow_refresh(args, cfg, servicer, metrics)
            engine = servicer.engine
        router = _experiment(args, cfg, servicer, ds, icfg, metrics)
        from serving.discovery import warm

        warm(servicer.engine)  # CompleteBasket / SearchProducts models, before SERVING
        if cfg.gc_freeze:
            import gc

            gc.collect()
            gc.freeze()  # long-lived start-up objects: never scanned by later collections
        handle.set_ready(True)
        if engine.user_vectors is not None:
            engine.user_vectors.warm_async()  # FindAudience's customer vectors, off the request path
        log.info(
            "serving %s (index %s) on %s:%d, metrics %s, loaded in %.1f s",
            engine.model_version,
            engine.index_version(index) if problem is None else "UNAVAILABLE: " + problem,
            cfg.host,
            handle.port,
            f"{cfg.metrics_host}:{handle.metrics_port}" if handle.metrics_port else "off",
            time.perf_counter() - t0,
        )
        done.wait()
    finally:
        # every step runs even when one before it fails: the private index copy (temp
        # folder) must go on every exit path
        try:
            if reloader is not None:
                reloader.stop()
            if router is not None:
                router.stop()
        finally:
            try:
                handle.stop(cfg.grace_s)
            finally:
                try:
                    if index is not None:
                        index.close()
                finally:
                    if triton_proc is not None:
                        triton_proc.stop()
    return 0


def require_index_dir(icfg: Any) -> None:
    """Refuse an embedded ``--index`` folder that is not an index (no ``aliases/``), so a
    typo is an error naming the path instead of an empty index created there."""
    from ecomrec.errors import NotFoundError

    if icfg.backend != "edge" or icfg.location == ":memory:":
        return
    root = Path(icfg.location)
    if not (root / "aliases").is_dir():
        what = "does not exist" if not root.exists() else "is not an index (no aliases/ folder)"
        raise NotFoundError(
            f"serve: index {root} {what}; nothing was created there: build one with "
            f"`ecomrec index build --index {root} ...` (or serve --build-index), or check --index"
        )


def _follow_refresh(args: argparse.Namespace, cfg: Any, servicer: Any, metrics: Any) -> Any:
    """Serve the live deployment of ``ecomrec refresh`` (if any) and reload on each change."""
    from serving.reload import EngineReloader, engine_from_record
    from serving.segments import TableSegmentLookup

    seg_dir = Path(args.segments) if args.segments and Path(args.segments).is_dir() else None

    def segments_for(ds: Any) -> Any:
        # a raw-id export maps onto each deployment's own user numbering
        return TableSegmentLookup.from_marketing_export(seg_dir, ds.users) if seg_dir else None

    reloader = EngineReloader(
        servicer,
        args.follow_refresh,
        lambda rec: engine_from_record(rec, cfg, segments_for=segments_for, metrics=metrics),
    )
    if not reloader.reload():  # the live deployment; none yet: keep the engine just built
        reloader.adopt()
    reloader.watch(args.follow_interval)
    reloader.install_sighup()
    log.info("following refresh deployments in %s", args.follow_refresh)
    return reloader


def _experiment(
    args: argparse.Namespace, cfg: Any, servicer: Any, ds: Any, icfg: Any, metrics: Any
) -> Any:
    """The A/B router (``serve.experiment``, else ``STATE/experiment.json`` under
    --follow-refresh), attached to the servicer and polled; None without a test."""
    import signal

    from ecomrec.errors import ConfigError
    from outcomes.experiment import load_experiment
    from serving.discovery import warm
    from serving.segments import TableSegmentLookup
    from serving.variants import VariantRouter, variant_factory

    if cfg.experiment:
        path = Path(cfg.experiment)
        if not path.is_file():
            raise ConfigError(f"serve.experiment: {path} does not exist")
        load_experiment(path)  # a bad file is refused at start (clear error, exit 2)
    elif args.follow_refresh:
        path = Path(args.follow_refresh) / "experiment.json"  # staged by `ecomrec refresh`
    else:
        return None
    seg_dir = Path(args.segments) if args.segments and Path(args.segments).is_dir() else None

    def segments_for(d: Any) -> Any:
        return TableSegmentLookup.from_marketing_export(seg_dir, d.users) if seg_dir else None

    factory = variant_factory(
        cfg,
        dataset=ds,
        index_cfg=icfg,
        metrics=metrics,
        segments_for=segments_for,
        check=check_index_matches_model,
    )
    router = VariantRouter(path, factory, warmup=warm)
    if not router.reload() and cfg.experiment:
        raise ConfigError(f"serve.experiment: {path}: {router.last_error}")
    servicer.router = router
    router.watch(cfg.experiment_poll_s)
    previous = signal.getsignal(signal.SIGHUP)

    def on_hup(signum: int, frame: Any) -> None:  # the experiment too is re-read on SIGHUP
        import threading

        threading.Thread(target=router.reload, name="ecomrec-exp-hup", daemon=True).start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, on_hup)
    log.info("A/B experiment file %s (polled every %.1f s)", path, cfg.experiment_poll_s)
    return router


def check_index_matches_model(index: object, model: object, location: str) -> None:
    """Refuse an index whose vectors come from another model (or catalogue) than ``model``.

    An index that cannot be opened at all (damaged, missing) is not a mismatch: the service
    starts degraded (popularity, health NOT_SERVING) and the index monitor reports it."""
    from ecomrec.errors import IndexUnavailableError, MismatchError

    get = getattr(index, "manifest", None)
    if get is None:
        return
    try:
        m = get()
    except IndexUnavailableError as e:
        log.error("index could not be checked against the model: %s", e)
        return
    prov = getattr(m, "provenance", None) or {}
    want = getattr(model, "model_version", None)
    items = prov.get("model_items")
    if items and items != getattr(model, "items_hash", items):
        raise MismatchError(
            f"serve: index {location} ({m.version}) was built over another catalogue "
            f"(items fingerprint {items}) than run {getattr(model, 'run_dir', '?')}: rebuild it "
            "with `ecomrec index build --model RUN --dataset DATASET` (or serve --build-index)"
        )
    if m.model_version != want:
        raise MismatchError(
            f"serve: index {location} ({m.version}) holds vectors of model {m.model_version}, "
            f"not of the served model {want}: rebuild it with `ecomrec index build --model "
            f"{getattr(model, 'run_dir', 'RUN')} --dataset DATASET` (or serve --build-index)"
        )


def _api_key(arg: str | None) -> str | None:
    if arg:
        return arg
    env = os.environ.get("ECOMREC_API_KEYS", "")
    return env.split(",")[0].strip() or None


def _recommend(args: argparse.Namespace) -> int:
    import time

    from google.protobuf.json_format import MessageToDict

    from serving.client import RecommendClient, format_response

    events = []
    for e in args.event:
        item, _, et = e.partition(":")
        events.append((item, et or "view", int(time.time())))
    import grpc

    with RecommendClient(args.target, api_key=_api_key(args.api_key), timeout_s=args.timeout) as c:
        try:
            resp = c.recommend(
                args.user,
                args.k,
                events=events,
                categories=args.category,
                price_min=args.price_min,
                price_max=args.price_max,
                mode="" if args.mode == "explore" else args.mode,
            )
        except grpc.RpcError as e:
            print(f"ecomrec: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(MessageToDict(resp), indent=2))
    else:
        print(format_response(resp))
    return 0
