"""Item and user vectors in Qdrant: the ``ItemIndex`` protocol, embedded and server backends,
versioned builds with verification and atomic alias swaps (see docs/indexing.md)."""

from indexing.base import (
    Hit,
    IndexConfig,
    IndexManifest,
    ItemIndex,
    SearchFilter,
    UserFilter,
    VectorSearch,
    VerificationError,
)

__all__ = [
    "Hit",
    "IndexConfig",
    "IndexManifest",
    "ItemIndex",
    "SearchFilter",
    "UserFilter",
    "VectorSearch",
    "VerificationError",
]
