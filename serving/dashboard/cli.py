"""``ecomrec dashboard``: the read-only web dashboard (docs/dashboard.md)."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from typing import Any

log = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dashboard``."""
    from ecomrec.config import add_config_args

    d = sub.add_parser(
        "dashboard",
        help="web dashboard for marketers and analysts (online metrics, A/B, segments, "
        "churn warnings, customer lookup); read-only, signs in with the service's API keys",
    )
    add_config_args(
        d,
        tables="a [dashboard] table (DashboardConfig) and the service's [serve] table (its "
        "API keys: api_keys, $api_keys_env, admin_keys), e.g. ecomrec/configs/serving/"
        "serve.toml; default: built-in defaults, keys from $ECOMREC_API_KEYS",
        example="dashboard.max_warnings=500",
        flags="--target, --host, --port, --report, --segments, --previous-segments, --warnings",
    )
    d.add_argument(
        "--target",
        default=None,
        help="HOST:PORT of the running Recommend service (default: the config's, 127.0.0.1:50051)",
    )
    d.add_argument("--host", default=None, help="bind address (default: the config's, 127.0.0.1)")
    d.add_argument(
        "--port",
        type=int,
        default=None,
        help="HTTP port, 0 = a free one (default: the config's, 8080)",
    )
    d.add_argument(
        "--report",
        default=None,
        help="online report: `ecomrec report online --out DIR`'s DIR or DIR/online.json "
        "(default: the config's)",
    )
    d.add_argument(
        "--segments",
        default=None,
        help="current segment snapshot: a `segments export` or `segments report` folder "
        "(default: the config's)",
    )
    d.add_argument(
        "--previous-segments",
        default=None,
        help="previous snapshot, for the movement between the two (default: the config's)",
    )
    d.add_argument(
        "--warnings",
        default=None,
        help="churn warnings file (JSON Lines of the churn watcher) (default: the config's)",
    )
    d.set_defaults(func=_dashboard)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = a free one), bound before the app starts so the
    address can be printed first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from ecomrec.errors import ConfigError

        raise ConfigError(f"dashboard: cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def load(args: argparse.Namespace) -> tuple[Any, tuple[str, ...]]:
    """(DashboardConfig, the service's API keys) from --config / --set / the flags."""
    from ecomrec.config import read_config
    from ecomrec.errors import ConfigError
    from serving.config import serve_config
    from serving.dashboard.config import DashboardConfig

    src = read_config(args.config, args.set)
    serve = serve_config(src)  # checks the file's tables as `ecomrec serve` does
    cfg = src.build(
        DashboardConfig,
        "dashboard",
        {
            "target": args.target,
            "host": args.host,
            "port": args.port,
            "report": args.report,
            "segments": args.segments,
            "previous_segments": args.previous_segments,
            "warnings": args.warnings,
        },
    )
    keys = serve.resolved_api_keys()
    if not keys:
        raise ConfigError(
            "the dashboard signs in with the service's API keys and none are configured: set "
            f"${serve.api_keys_env} (comma-separated) or [serve] api_keys"
        )
    return cfg, keys


def _dashboard(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.dashboard.app import create_app
    from serving.dashboard.lookup import ServiceLookup

    cfg, keys = load(args)
    lookup = ServiceLookup(cfg.target, tls_ca=cfg.tls_ca, timeout_s=cfg.timeout_s)
    app = create_app(cfg, keys, lookup)
    sock = bind(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    # the first line on stdout is the address (tests and scripts read it)
    print(f"dashboard on http://{cfg.host}:{port} (service {cfg.target})", flush=True)
    # no access log: request lines carry customer ids (the service pseudonymises its logs)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
    )
    # uvicorn stops gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
    # that was there before it: ours, which only notes it, so the process ends here with 0
    # (not killed by the signal) after closing the gRPC channel
    stops: list[int] = []
    before = {s: signal.signal(s, lambda n, _f: stops.append(n)) for s in _STOP_SIGNALS}
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        lookup.close()
        sock.close()
    log.info("dashboard stopped (%s)", ", ".join(signal.Signals(n).name for n in stops) or "exit")
    sys.stdout.flush()
    return 0
