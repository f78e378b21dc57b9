"""``ServeConfig``: how the service runs, built from TOML (unknown keys are an error)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ecomrec.config import DEPLOY_TABLES, ConfigSource, builtin_config, parse_sets, read_config
from ecomrec.errors import ConfigError
from indexing.base import IndexConfig

#: The re-rank policies shipped with the package (ecomrec/configs/serving/rerank.toml).
DEFAULT_RERANK = builtin_config("serving", "rerank")


@dataclass(frozen=True)
class ServeConfig:
    """Server, request-path and security settings of the Recommend service.

    ``api_keys`` may be left empty and supplied through the environment variable named
    by ``api_keys_env`` (comma-separated) so keys never sit in a config file; when both
    are empty, authentication is OFF (development only; logged as a warning).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    # Prometheus metrics on their own port (0 = pick a free one, -1 = disabled), plain
    # HTTP on their own host (default: this machine only).
    metrics_port: int = -1
    metrics_host: str = "127.0.0.1"
    workers: int = 8
    # RecommendBatch streams open at once; must be < workers so unary calls always find a
    # worker (further streams get RESOURCE_EXHAUSTED).
    max_streams: int = 2
    # Reflection streams open at once (their own slots: idle ones never block batches).
    max_reflection_streams: int = 2
    # Calls in flight with a valid API key (every method); more get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 256
    # Health calls in flight WITHOUT a key (their own budget: keyless callers can never
    # take a keyed caller's place); a keyless call must send its request within
    # open_request_timeout_s (then CANCELLED).
    max_open_rpcs: int = 32
    open_request_timeout_s: float = 5.0
    max_message_bytes: int = 1 << 20
    # Requests without a deadline get this one (seconds).
    default_deadline_s: float = 2.0
    # SIGTERM: health NOT_SERVING while still answering for shutdown_delay_s (load
    # balancers drain), then the port closes and in-flight calls get grace_s.
    shutdown_delay_s: float = 2.0
    grace_s: float = 5.0
    # Index health: check the live version every index_check_s (0 = off; sizes vs the
    # checksums, full hashes every index_full_check_every checks).  A broken index turns
    # health NOT_SERVING unless unhealthy_on_index_error is false (answers are degraded
    # segment popularity either way).
    index_check_s: float = 30.0
    index_full_check_every: int = 10
    unhealthy_on_index_error: bool = True
    # Serve from a checked private copy of each index version (a truncated published
    # file cannot SIGBUS the server); index_copy_dir "" = the system temp directory.
    index_local_copy: bool = True
    index_copy_dir: str = ""
    # Request limits.
    max_k: int = 200
    max_recent_events: int = 200
    max_batch_requests: int = 1000  # RecommendBatch: requests per call
    max_exclude_ids: int = 1000
    max_id_length: int = 128
    max_text_length: int = 1000
    # Live events (TrackEvents, docs/events.md): the embedded event log's file ("" = no
    # TrackEvents: it answers FAILED_PRECONDITION), the log position the served data already
    # holds (events after it are replayed into the live history at start), events per call.
    event_log: str = ""
    event_log_since: int = 0
    max_track_events: int = 1000
    # Live history kept in memory: the newest events per customer, for this many customers
    # (the least recently active are dropped first; their events stay in the log).
    live_events_per_customer: int = 200
    live_customers: int = 100_000
    # ForgetCustomer (admin): the keys allowed to call it (accepted as API keys too),
    # and the dataset folder / derived folders it cleans (docs/events.md, "Forget").
    admin_keys: tuple[str, ...] = ()
    forget_dataset: str = ""
    forget_artifacts: tuple[str, ...] = ()
    # Retrieval: ANN fetches k * overfetch candidates (at least min_candidates) for re-ranking.
    overfetch: int = 4
    min_candidates: int = 50
    # Recommend mode "buy-again": own items score weight * rf / max rf (+ their retrieval
    # score), rf = invoices with the item x 2^(-age / half-life) (towers.sequences.ItemBag).
    buy_again_half_life_days: float = 90.0
    buy_again_weight: float = 1.0
    hnsw_ef: int = 128
    # Catalogues up to this many items are searched exactly in numpy (one matrix product
    # per batch of requests) instead of through HNSW; 0 = always the index.  Crossover
    # measured by benchmarks/exact_crossover.py (docs/serving.md).
    exact_max_items: int = 100_000
    # User encoder: "inprocess" (torch), "onnx" (the exported tower on onnxruntime, in
    # process) or "triton" (tritonclient.grpc, in-process torch as fallback).
    encoder: Literal["inprocess", "onnx", "triton"] = "inprocess"
    # Where Recommend does its work (the server is grpc.aio, one event loop per process):
    # "loop" = on the event loop, one request after another (no thread hand-offs: the
    # cheapest for a fast in-process encoder such as ONNX); "threads" = on the worker
    # threads, concurrent requests' encode + search batched (Triton's round trips, the
    # torch tower's batch-1 cost); "auto" = "loop" for encoder "onnx", else "threads".
    recommend_path: Literal["auto", "loop", "threads"] = "auto"
    # Micro-batching on the "threads" path: concurrent requests share one forward (0 = off).
    batch_max: int = 16
    batch_wait_ms: float = 0.5
    # Several server processes on one port (SO_REUSEPORT): start N `ecomrec serve` with this on.
    reuse_port: bool = False
    # After start-up, move everything loaded (catalogue, histories, model) out of the
    # garbage collector's view (gc.freeze): collections triggered by per-request objects
    # stop re-scanning ~450k long-lived objects (measured -0.5 ms CPU per request).
    gc_freeze: bool = True
    # In-process tower precision: "int8" = dynamic int8 quantisation of the Linear layers (CPU).
    quantize: Literal["none", "int8"] = "none"
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "user_tower"
    triton_timeout_s: float = 1.0
    # Triton down -> in-process encoder when the model is local (answers marked degraded).
    fallback_to_inprocess: bool = True
    # Security.
    api_keys: tuple[str, ...] = ()
    api_keys_env: str = "ECOMREC_API_KEYS"
    tls_cert: str | None = None
    tls_key: str | None = None
    # Salt of the keyed hash that pseudonymises user ids in logs.
    pseudonym_salt: str = "ecomrec-logs"
    # Re-ranking policies per segment (TOML). Default: the file shipped with the package
    # (resolved from the package, not the working directory); "" turns re-ranking off; a
    # path that does not exist is an error.
    rerank_policies: str = str(DEFAULT_RERANK)
    # CompleteBasket / SearchProducts (docs/complements.md): the co-purchase model and the
    # product search are built from the served dataset (`ecomrec serve` builds them before
    # health turns SERVING); false = that call answers UNAVAILABLE.
    complements: bool = True
    product_search: bool = True
    # Online outcomes (docs/outcomes.md): every answer carries a recommendation_id; what was
    # served is written off the hot path to the served-recommendation log: this SQLite file
    # ("" = a table in event_log's file; no event_log either = ids only, nothing recorded),
    # committed every served_log_flush_s (a crash loses at most that much attribution).
    # The live /metrics attribution keeps the newest outcomes_live_answers answers in memory.
    served_log: str = ""
    served_log_flush_s: float = 0.2
    outcomes_live_answers: int = 50_000
    # Live event log back end (docs/events.md): "sqlite" = the embedded file event_log
    # (one replica); "nats" = the replicated JetStream stream on nats_servers: TrackEvents is
    # acknowledged once 2 of 3 nodes hold the events, and every replica's live history
    # follows the stream (an event tracked on one replica reaches all); event_log_since is
    # the stream position the served data already holds.
    event_backend: Literal["sqlite", "nats"] = "sqlite"
    nats_servers: tuple[str, ...] = ()
    nats_stream: str = "ECOMREC_EVENTS"
    nats_subject_prefix: str = "events"
    # one publish attempt; an append retries (same message ids) until nats_append_deadline_s
    nats_ack_timeout_s: float = 5.0
    nats_append_deadline_s: float = 60.0
    # ForgetCustomer also removes the customer's point from the user-vector collection
    # (`index build --users`) of this index: an embedded directory or a Qdrant URL ("" = not
    # touched); forget_users_alias names the collection.
    forget_user_index: str = ""
    forget_users_alias: str = "users"
    # A/B test (docs/outcomes.md, "A/B tests"): a TOML/JSON experiment file naming variants
    # (run, index version, traffic share); customers are assigned by a stable hash of
    # (experiment, customer id); the file is re-read when it changes (every
    # experiment_poll_s, and on SIGHUP): new shares or an ended test need no restart.
    # "" = no test (under --follow-refresh STATE: STATE/experiment.json when it exists,
    # written by `ecomrec refresh` with [refresh] promote = "online").
    experiment: str = ""
    experiment_poll_s: float = 2.0
    # SearchProducts with a customer: final = hybrid + search_personal_weight * cos(user,
    # item) over the hybrid's top 100; 0.5 chosen on Beauty's validation customers by
    # benchmarks/search.py --personal-run (docs/complements.md); 0 = never personalised
    search_personal_weight: float = 0.5
    # SearchProducts: recent queries whose nearest item texts are kept (0 = off)
    search_query_cache: int = 4096
    # SearchProducts: recent customers' user vectors kept, keyed by their stored history
    # (a customer's next search skips the user-tower forward; 0 = off)
    search_user_cache: int = 4096
    # SearchProducts: the query encoder's precision, "int8" (quantised MiniLM, ~2.4x less CPU
    # per new query) or "fp32"; int8 chosen on validation queries by benchmarks/search.py
    # (Beauty 0.8433 vs 0.8424, Online Retail: docs/complements.md)
    search_query_precision: str = "int8"

    def __post_init__(self) -> None:
        for name in (
            "workers",
            "max_k",
            "overfetch",
            "max_message_bytes",
            "max_concurrent_rpcs",
            "max_open_rpcs",
            "max_reflection_streams",
            "index_full_check_every",
            "max_batch_requests",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"ServeConfig.port must be in [0, 65535], got {self.port}")
        if (
            self.default_deadline_s <= 0
            or self.triton_timeout_s <= 0
            or self.open_request_timeout_s <= 0
        ):
            raise ConfigError("ServeConfig deadlines must be > 0")
        if self.rerank_policies and not Path(self.rerank_policies).is_file():
            raise ConfigError(
                f"ServeConfig.rerank_policies: {self.rerank_policies} does not exist "
                f'(default: {DEFAULT_RERANK}; "" turns re-ranking off)'
            )
        if self.recommend_path not in ("auto", "loop", "threads"):
            raise ConfigError(
                "ServeConfig.recommend_path must be auto, loop or threads, "
                f"got {self.recommend_path!r}"
            )
        if not 0 <= self.max_streams < self.workers:
            raise ConfigError(
                f"ServeConfig.max_streams must be in [0, workers={self.workers}), "
                f"got {self.max_streams} (streams would starve unary calls)"
            )
        if self.shutdown_delay_s < 0 or self.grace_s < 0 or self.index_check_s < 0:
            raise ConfigError("ServeConfig shutdown_delay_s, grace_s, index_check_s must be >= 0")
        if self.served_log_flush_s <= 0 or self.outcomes_live_answers < 1:
            raise ConfigError(
                "ServeConfig.served_log_flush_s must be > 0 and outcomes_live_answers >= 1"
            )
        if self.experiment_poll_s <= 0:
            raise ConfigError(
                f"ServeConfig.experiment_poll_s must be > 0, got {self.experiment_poll_s}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("ServeConfig: set both tls_cert and tls_key, or neither")
        if self.search_query_precision not in ("fp32", "int8"):
            raise ConfigError(
                "ServeConfig.search_query_precision must be fp32 or int8, "
                f"got {self.search_query_precision!r}"
            )
        if self.event_backend not in ("sqlite", "nats"):
            raise ConfigError(
                f"ServeConfig.event_backend must be sqlite or nats, got {self.event_backend!r}"
            )
        if self.event_backend == "nats" and not self.nats_servers:
            raise ConfigError(
                'ServeConfig.nats_servers is empty (event_backend = "nats" needs the '
                'cluster\'s client URLs, e.g. ["nats://nats-0:4222", "nats://nats-1:4222"])'
            )

    @property
    def recommend_on_loop(self) -> bool:
        """Whether Recommend runs on the event loop (``recommend_path``, resolved)."""
        if self.recommend_path == "auto":
            return self.encoder == "onnx"
        return self.recommend_path == "loop"

    def resolved_api_keys(self) -> tuple[str, ...]:
        """Keys from the config plus those in ``$api_keys_env`` (comma-separated), plus the
        admin keys (an admin key is an API key that may also call the admin RPCs)."""
        env = os.environ.get(self.api_keys_env, "")
        extra = tuple(k.strip() for k in env.split(",") if k.strip())
        return tuple(dict.fromkeys((*self.api_keys, *extra, *self.admin_keys)))


def index_config(src: ConfigSource, **overrides: Any) -> IndexConfig | None:
    """The ``[index]`` table of an already read config (None when it has none and no
    override is given); ``overrides`` are flags (None = not given)."""
    if "serve" in src.data or "index" in src.data:  # else: a top-level [serve]-less file
        src.check_tables(DEPLOY_TABLES)
    if "index" not in src.data:
        return None
    return src.build(IndexConfig, "index", overrides)


def load_index_config(
    path: str | Path | None, *, sets: Sequence[str] = (), **overrides: Any
) -> IndexConfig | None:
    """The ``[index]`` table of the serve TOML (which index the service opens: an embedded
    directory or a Qdrant server URL with shards, replicas, write consistency), or None
    when the file has none. The API key comes from ``$api_key_env`` (a Secret in deploy/).
    """
    if path is None and not sets:
        return None
    return index_config(read_config(path, sets), **overrides)


def serve_config(src: ConfigSource, **overrides: Any) -> ServeConfig:
    """ServeConfig from the ``[serve]`` table (or the top level of a file without one) of
    an already read config, then the flags' ``overrides`` (None = not given)."""
    if "serve" in src.data:
        src.check_tables(DEPLOY_TABLES)
        data = src.table("serve")
        table: str | None = "serve"
    else:
        data, table = src.table(None), None
    rp = data.get("rerank_policies")
    given = parse_sets(src.sets)
    from_set = "rerank_policies" in (given.get("serve", {}) if table else given)
    if (
        src.path is not None
        and not from_set
        and isinstance(rp, str)
        and rp
        and not Path(rp).is_absolute()
    ):
        # relative to the TOML file, not to the working directory (a --set value: to the
        # working directory)
        data["rerank_policies"] = str(src.path.resolve().parent / rp)
    return src.build(ServeConfig, table, overrides, data=data)


def load_serve_config(
    path: str | Path | None = None, *, sets: Sequence[str] = (), **overrides: Any
) -> ServeConfig:
    """Read ``[serve]`` (or the top level) of a TOML file, ``--set serve.KEY=VALUE``
    values, then apply ``overrides`` (flags; None = not given)."""
    return serve_config(read_config(path, sets), **overrides)
