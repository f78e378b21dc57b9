"""Process memory helpers for CPU training (no heavy imports: usable before torch loads)."""

from __future__ import annotations

import os
import resource

__all__ = ["bound_heap_growth", "peak_rss_mb", "release_free_memory"]

# oneDNN (bf16 matmuls on this CPU) caches one primitive per input shape, up to 1024 by
# default, each holding reordered weights (the 12k x 64 item table: ~1.5 MB); training
# batches have a different number of real positions every step, so the cache only grows.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = "16"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BOUNDED = False


def bound_heap_growth(threshold_bytes: int = 1 << 20) -> bool:
    """Keep CPU training's resident memory near its working set (glibc only; idempotent).

    Training allocates tensors of a different size every step (batches are padded to their
    own length). glibc's dynamic mmap threshold then moves every block under 32 MB to the
    heap, where freed blocks fragment and are not returned: Beauty ids-only grew from
    0.6 GB to 3.5 GB over 20 epochs. Fixing the mmap and trim thresholds at
    ``threshold_bytes`` returns large blocks to the OS when freed (measured: 50 steps +
    one evaluation, peak 1.48 -> 1.10 GB, a little more system time). Returns whether the
    thresholds were set (False off glibc). Also caps oneDNN's primitive cache (see
    ``ONEDNN_CACHE_ENV``): 150 Beauty steps grew the process by 85 MB instead of 147 MB.
    """
    global _HEAP_BOUNDED
    if _HEAP_BOUNDED:
        return True
    # read by oneDNN when it creates its first primitive (after this, unless torch already ran
    # a oneDNN op); a value the user set wins
    os.environ.setdefault(ONEDNN_CACHE_ENV, ONEDNN_CACHE_CAPACITY)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes)
        )
    except (OSError, AttributeError):
        return False
    _HEAP_BOUNDED = ok
    return ok


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Called after each epoch: small freed blocks in the middle of the heap stay resident
    otherwise (measured ~45 MB per 25 Beauty steps).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
