"""EASE's closed-form item-item weights (Steck, WWW 2019), shared by the EASE baseline,
the baseline fallback and the basket tower's co-purchase initialisation."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp


def ease_weights(x: sp.spmatrix, l2: float) -> np.ndarray:
    """(N+1, N+1) float32 ``B = I - P / diag(P)``, ``P = (X^T X + l2 I)^-1``, zero diagonal,
    from a binary users x items matrix ``x`` (U+1, N+1) whose column 0 is padding (its row
    and column of ``B`` are zero).

    One N x N float32 buffer, inverted in place: ~0.6 GB for 12k items instead of ~3.5 GB of
    float64 copies; matches the float64 closed form to ~1e-5.
    """
    n = x.shape[1]
    xf = sp.csr_matrix(x, dtype=np.float32)
    g = (xf.T @ xf).toarray()  # (N+1, N+1) float32
    g[np.diag_indices(n)] += l2
    p = scipy.linalg.inv(g, overwrite_a=True, check_finite=False)  # (N+1, N+1)
    del g
    d = np.diag(p).copy()
    p /= -d[None, :]
    np.fill_diagonal(p, 0.0)
    p[0, :] = 0.0
    p[:, 0] = 0.0
    return np.asarray(p, np.float32)
