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
