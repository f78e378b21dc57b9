"""Forget a customer everywhere, the user-vector collection included.

:func:`intake.forget.forget_customer` cleans the live log, the dataset folder and derived
files; this layer (which may import both intake and indexing) adds the stored user vectors:
the customer's point is removed from the user collection (``indexing.users.forget_user``:
the live version rebuilt without it, the other versions dropped) before the trace search,
and an embedded index directory is searched byte by byte with the other folders. What
``ecomrec customers forget --index`` and the admin ``ForgetCustomer`` RPC run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from indexing.base import IndexConfig
from indexing.users import USERS_ALIAS
from intake.forget import ForgetReceipt, forget_customer
from intake.live_log import EventLog


def user_index_config(location: str) -> IndexConfig | None:
    """The index at ``location``: a Qdrant URL (server back end; API key from
    ``$QDRANT_API_KEY``) or an embedded directory; None for ""."""
    if not location:
        return None
    remote = location.startswith(("http://", "https://"))
    return IndexConfig(backend="server" if remote else "edge", location=location)


def user_vector_forgetter(
    index: IndexConfig, alias: str = USERS_ALIAS
) -> Callable[[str], list[tuple[str, int]]]:
    """A ``forget_customer`` forgetter removing the customer from user collection ``alias``
    of the index at ``index`` (embedded directory or Qdrant server)."""

    def forget(customer_id: str) -> list[tuple[str, int]]:
        from indexing.build import open_store
        from indexing.users import forget_user

        store = open_store(index)
        try:
            r = forget_user(store, customer_id, alias=alias)
        finally:
            store.close()
        lines = [(f"points in user collection {alias!r} of {index.location}", r.removed)]
        if r.version is not None:
            lines.append(
                (f"versions of {alias!r} dropped (rebuilt as {r.version})", len(r.dropped))
            )
        return lines

    return forget


def forget_everywhere(
    customer_id: str,
    dataset_dir: str | Path,
    *,
    event_log: EventLog | None = None,
    artifacts: Sequence[str | Path] = (),
    keys: Sequence[str] = (),
    user_index: IndexConfig | None = None,
    users_alias: str = USERS_ALIAS,
) -> ForgetReceipt:
    """:func:`~intake.forget.forget_customer` plus the user vectors of ``user_index``."""
    forgetters = []
    search: list[Path] = []
    if user_index is not None:
        forgetters.append(user_vector_forgetter(user_index, users_alias))
        if user_index.backend == "edge":
            search.append(Path(user_index.location))
    return forget_customer(
        customer_id,
        dataset_dir,
        event_log=event_log,
        artifacts=artifacts,
        keys=keys,
        forgetters=forgetters,
        search=search,
    )
