"""``ecomrec basket ITEM...`` and ``ecomrec search TEXT``: clients of a running service."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the service")
    p.add_argument("--user", default="", help="external user id (personalises the answer)")
    p.add_argument("-k", type=int, default=10, help="number of products")
    p.add_argument(
        "--category", action="append", default=[], help="only this category (repeatable)"
    )
    p.add_argument("--price-min", type=float, default=None, help="lowest price")
    p.add_argument("--price-max", type=float, default=None, help="highest price")
    p.add_argument("--in-stock", action="store_true", help="only items in stock")
    p.add_argument("--api-key", default=None, help="default: first key of $ECOMREC_API_KEYS")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print JSON")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``basket`` and ``search``."""
    b = sub.add_parser(
        "basket", help="complementary products for items in a cart or on a page (client)"
    )
    b.add_argument("items", nargs="+", metavar="ITEM", help="external item ids of the basket")
    _common(b)
    b.set_defaults(func=_basket)
    s = sub.add_parser("search", help="products for a text query (client)")
    s.add_argument("query", help='the shopper\'s words, e.g. "gentle cleanser for oily skin"')
    _common(s)
    s.set_defaults(func=_search)


def _call(args: argparse.Namespace, fn: Callable[[Any], Any]) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from serving.client import RecommendClient, format_products

    key = args.api_key or os.environ.get("ECOMREC_API_KEYS", "").split(",")[0].strip() or None
    with RecommendClient(args.target, api_key=key, timeout_s=args.timeout) as c:
        try:
            resp = fn(c)
        except grpc.RpcError as e:
            print(f"ecomrec: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2
    print(json.dumps(MessageToDict(resp), indent=2) if args.json else format_products(resp))
    return 0


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "categories": args.category,
        "price_min": args.price_min,
        "price_max": args.price_max,
        "in_stock_only": args.in_stock,
    }


def _basket(args: argparse.Namespace) -> int:
    return _call(args, lambda c: c.complete_basket(args.items, args.user, args.k, **_filters(args)))


def _search(args: argparse.Namespace) -> int:
    return _call(args, lambda c: c.search_products(args.query, args.user, args.k, **_filters(args)))
