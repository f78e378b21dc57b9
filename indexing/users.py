"""User-vector collection: one point per user with segment and churn payload.

For audience queries ("users closest to this product/campaign vector, in segment X,
churn risk above 0.5") and analyst exports.  Same stores, versions and alias swap as
items, under the alias ``users`` by default.  Payload per user:

``external_id`` str, ``segment`` str (behavioural segment) or None, ``rfm_segment``
str or None, ``churn_risk`` float in [0, 1] or None.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecomrec.errors import DataError
from indexing.base import USER_PAYLOAD_INDEXES, Hit, IndexManifest, UserFilter, check_query_vector
from indexing.build import build_version
from indexing.store import IndexStore, fetch_limit

log = logging.getLogger(__name__)

USERS_ALIAS = "users"


def user_payloads(
    user_ids: np.ndarray,
    external_ids: Sequence[str],
    *,
    segments: Mapping[int, str] | None = None,
    rfm_segments: Mapping[int, str] | None = None,
    churn_risk: Mapping[int, float] | None = None,
) -> list[dict[str, Any]]:
    """Payloads for users ``(N,)``; the mappings are keyed by internal user id."""
    if len(user_ids) != len(external_ids):
        raise DataError(f"{len(user_ids)} user ids but {len(external_ids)} external ids")
    out = []
    for uid, ext in zip(np.asarray(user_ids).tolist(), external_ids):
        risk = None if churn_risk is None else churn_risk.get(uid)
        if risk is not None and not 0.0 <= float(risk) <= 1.0:
            raise DataError(
                f"churn risk of user {uid} is {risk}, expected [0, 1]", column="churn_risk"
            )
        out.append(
            {
                "external_id": str(ext),
                "segment": None if segments is None else segments.get(uid),
                "rfm_segment": None if rfm_segments is None else rfm_segments.get(uid),
                "churn_risk": None if risk is None else float(risk),
            }
        )
    return out


def build_user_index(
    store: IndexStore,
    user_ids: np.ndarray,
    vectors: np.ndarray,
    payloads: Sequence[dict[str, Any]],
    *,
    model_version: str,
    config_hash: str = "",
    alias: str = USERS_ALIAS,
) -> IndexManifest:
    """Build, verify (recall of user-to-user ANN vs exact) and publish the user collection.

    Users with an empty history have a zero vector: drop them before calling.
    """
    return build_version(
        store,
        user_ids,
        vectors,
        payloads,
        model_version=model_version,
        config_hash=config_hash,
        alias=alias,
        kind="users",
        payload_indexes=dict(USER_PAYLOAD_INDEXES),
    )


def audience(
    store: IndexStore,
    vector: np.ndarray,
    k: int,
    flt: UserFilter | None = None,
    *,
    alias: str = USERS_ALIAS,
    hnsw_ef: int | None = None,
) -> list[Hit]:
    """The ``k`` users whose vectors are closest to ``vector (D,)`` (e.g. an item vector)."""
    reader = store.open(alias=alias)
    try:
        v = check_query_vector(vector, reader.dim)
        limit = fetch_limit(k, 1.0)
        exact = False
        if flt is not None and not flt.is_empty:
            exact = reader.count_raw(flt) < store.cfg.exact_threshold
        _, hits = reader.search_raw(v.reshape(1, -1), limit, [flt], hnsw_ef, exact)
        return hits[0]
    finally:
        reader.close()


@dataclass(frozen=True)
class UserForget:
    """What :func:`forget_user` did (never the id itself)."""

    removed: int  # points of the customer (over every version of the alias)
    version: str | None  # the rebuilt live version (None: the customer was nowhere)
    dropped: tuple[str, ...] = ()  # older / other versions dropped: they held the customer


def forget_user(store: IndexStore, external_id: str, *, alias: str = USERS_ALIAS) -> UserForget:
    """Remove a customer's point from the user-vector collection ``alias`` for good.

    A point deletion only marks the point deleted in the engine's segment files (its payload
    bytes, with the id, stay until the engine compacts them), and the versions kept for
    rollback hold it too. So when any version holds the customer (payload ``external_id``),
    the live version's other points are written into a **new version** (verified, then the
    alias swapped, as every build), and every other version of the alias is dropped. Cost:
    one rebuild of the collection per forget (seconds for 100k users); the user
    collection's rollback history restarts at this version.
    """
    live_version = store.alias_target(alias)
    if live_version is None:
        return UserForget(0, None)
    versions = [m.version for m in store.versions(alias)]
    removed = 0
    holding: list[str] = []
    for v in versions:
        n = sum(
            sum(1 for p in payloads if p.get("external_id") == external_id)
            for _, _, payloads in store.scroll_all(v, with_vectors=False)
        )
        if n:
            holding.append(v)
            removed = max(removed, n)
    if not holding:
        return UserForget(0, None)
    live = next(m for m in store.versions(alias) if m.version == live_version)
    ids_l: list[np.ndarray] = []
    vecs_l: list[np.ndarray] = []
    pays: list[dict[str, Any]] = []
    for ids, vecs, payloads in store.scroll_all(live_version, with_vectors=True):
        assert vecs is not None
        keep = np.array([p.get("external_id") != external_id for p in payloads], dtype=bool)
        ids_l.append(np.asarray(ids)[keep])
        vecs_l.append(np.asarray(vecs)[keep])
        pays += [p for p, k in zip(payloads, keep.tolist(), strict=True) if k]
    ids_all = np.concatenate(ids_l) if ids_l else np.zeros(0, dtype=np.int64)
    if len(ids_all) == 0:
        raise DataError(
            f"user collection {alias!r}: the forgotten customer is its only point; "
            "drop the collection instead"
        )
    manifest = build_version(
        store,
        ids_all,
        np.concatenate(vecs_l),
        pays,
        model_version=live.model_version,
        config_hash=live.config_hash,
        alias=alias,
        kind="users",
        payload_indexes=dict(USER_PAYLOAD_INDEXES),
        provenance=dict(live.provenance),
    )
    dropped = []
    for v in [m.version for m in store.versions(alias)] + store.incomplete_versions(alias):
        if v != manifest.version:
            store.drop_version(v)
            dropped.append(v)
    log.info(
        "forget: user collection %s rebuilt as %s without the customer; %d version(s) dropped",
        alias,
        manifest.version,
        len(dropped),
    )
    return UserForget(removed, manifest.version, tuple(dropped))
