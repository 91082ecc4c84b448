"""Non-negative matrix factorisation in torch, checked against scikit-learn.

V (n, C) ~ W (n, K) @ H (K, C) with all three non-negative and the Frobenius loss, as
`sklearn.decomposition.NMF(init="nndsvd", solver="cd")`. Rows of V are activation vectors (one
per spatial cell), rows of H are the K cluster prototypes, W holds each cell's cluster weights.

The solver is HALS (hierarchical alternating least squares): exact coordinate descent on one
column of W or one row of H at a time, the same update scikit-learn's "cd" solver makes. It
touches V only through the products V @ H.T and W.T @ V, so each outer iteration streams V
twice and creates no (n, C) temporary; the cheap (n, K) and (K, C) coordinate sweeps are
repeated a few times per product, which cuts the number of passes over V. Everything runs in
float32 on the chosen device (CUDA when present); only (K, K) and (K, C) summaries are reduced
in float64 for the error and the convergence test.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .sampling import sample_rows as sample

__all__ = [
    "TorchNMF",
    "make_nonnegative",
    "nndsvd",
    "nnls_converged",
    "nnls_rows",
    "relative_error",
]

_CHECK_ROWS = 65536  # rows per chunk when validating or reducing V, so no (n, C) temporary appears
_W_SWEEPS = 4  # coordinate sweeps over W per V @ H.T product (each sweep costs ~K/C of the product)
_H_SWEEPS = 8  # sweeps over H per W.T @ V product (H is (K, C): almost free)
NNLS_SWEEPS = 30  # coordinate sweeps of nnls_rows after its unconstrained start: the full pass's cell weights
NNLS_TOL = 1e-8  # nnls_converged stops when no weight moves by more than this x the largest weight in a sweep
NNLS_MAX_SWEEPS = 500  # ... or after this many sweeps


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_tensor(X: Any, device: torch.device | str | None, name: str) -> torch.Tensor:
    """Return X as a contiguous 2-D float32 tensor on `device`, sharing memory when it can."""
    if isinstance(X, torch.Tensor):
        T = X
    else:
        arr = np.asarray(X)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        with warnings.catch_warnings():
            # Read-only inputs (np.memmap, h5py views) are fine: V is never written to.
            warnings.simplefilter("ignore", UserWarning)
            T = torch.from_numpy(np.ascontiguousarray(arr))
    if T.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, channels) matrix, got shape {tuple(T.shape)}.")
    device = T.device if device is None else torch.device(device)
    return T.to(device=device, dtype=torch.float32).contiguous()


def _scan(V: torch.Tensor, name: str) -> float:
    """Validate V (finite, >= 0) and return ||V||_F^2, in one chunked pass.

    Per-row norms in float32 are accurate (C terms each); summing them in float64 keeps the
    total accurate too, where a single float32 reduction over n x C terms drifts by ~0.1 %.
    """
    sq, vmin = 0.0, np.inf
    for chunk in V.split(_CHECK_ROWS):
        sq += float(torch.linalg.vector_norm(chunk, dim=1).double().square().sum())
        if chunk.numel():
            vmin = min(vmin, float(chunk.amin()))
    if not np.isfinite(sq):
        n_bad = sum(int((~torch.isfinite(c)).sum()) for c in V.split(_CHECK_ROWS))
        if n_bad == 0:
            raise ValueError(f"{name} has values too large for float32 arithmetic; rescale it first.")
        raise ValueError(
            f"{name} contains {n_bad} NaN or infinite values; NMF needs finite activations. "
            "Check the model output (e.g. fp16 overflow) before fitting."
        )
    if vmin < 0:
        n_neg = sum(int((c < 0).sum()) for c in V.split(_CHECK_ROWS))
        raise ValueError(
            f"{name} contains {n_neg} negative values out of {V.numel()} (minimum {vmin:.4g}); "
            "NMF needs non-negative input. Take activations after a ReLU, or map them with "
            "precompute.nmf.make_nonnegative(X) first (and reuse its stats for every slide)."
        )
    return sq


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (n, l) of the columns of a tall Y (n, l).

    Cholesky-QR in float64: two thin products instead of a Householder QR, which is ~6x
    slower on tall matrices; falls back to QR when Y is rank-deficient.
    """
    Y64 = Y.double()
    L, info = torch.linalg.cholesky_ex(Y64.T @ Y64)
    if int(info) != 0:
        return torch.linalg.qr(Y).Q
    return torch.linalg.solve_triangular(L, Y64.T, upper=False).T.to(Y.dtype)


def nndsvd(
    V: torch.Tensor, k: int, *, seed: int = 0, n_power_iter: int = 2, oversample: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD start point for NMF (Boutsidis & Gallopoulos 2008), zeros left at zero.

    V: (n, C) non-negative float32 tensor (not validated here). Returns W (n, k), H (k, C) on
    V's device. The top-k singular triplets come from a seeded randomized SVD (range finder
    with `oversample` extra directions and `n_power_iter` power iterations), like
    scikit-learn's init="nndsvd"; the result does not depend on the signs the SVD picks. Two
    power iterations are plenty for a start point (on real activations the converged NMF error
    is the same as with scikit-learn's seven), and each one costs about two NMF iterations.
    """
    n, c = V.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    width = min(k + oversample, n, c)
    omega = torch.randn(c, width, generator=gen, dtype=torch.float32).to(V.device)
    Q = _orthonormal(V @ omega)
    for _ in range(n_power_iter):
        # Re-orthonormalise on both sides so small singular directions are not lost to rounding.
        Z = torch.linalg.qr(V.T @ Q).Q
        Q = _orthonormal(V @ Z)
    U_small, S, Vh = torch.linalg.svd(Q.T @ V, full_matrices=False)
    U = (Q @ U_small)[:, :k]
    S, Vh = S[:k], Vh[:k]

    W = torch.zeros(n, k, dtype=V.dtype, device=V.device)
    H = torch.zeros(k, c, dtype=V.dtype, device=V.device)
    # The leading pair of a non-negative matrix can be taken non-negative.
    W[:, 0] = S[0].sqrt() * U[:, 0].abs()
    H[0] = S[0].sqrt() * Vh[0].abs()
    for j in range(1, k):
        x, y = U[:, j], Vh[j]
        xp, yp, xn, yn = x.clamp(min=0), y.clamp(min=0), (-x).clamp(min=0), (-y).clamp(min=0)
        xp_n, yp_n, xn_n, yn_n = (torch.linalg.vector_norm(t) for t in (xp, yp, xn, yn))
        mp, mn = xp_n * yp_n, xn_n * yn_n
        # Keep whichever sign-part of the rank-one term carries more energy; a part with
        # zero norm is all zeros, so clamping the divisor just keeps it at zero.
        tiny = torch.finfo(V.dtype).tiny
        if mp > mn:
            u, v, sigma = xp / xp_n.clamp(min=tiny), yp / yp_n.clamp(min=tiny), mp
        else:
            u, v, sigma = xn / xn_n.clamp(min=tiny), yn / yn_n.clamp(min=tiny), mn
        scale = (S[j] * sigma).sqrt()
        W[:, j] = scale * u
        H[j] = scale * v
    eps = torch.finfo(torch.float32).eps
    W[W < eps] = 0
    H[H < eps] = 0
    return W, H


def _sweep_rows(X: torch.Tensor, P: torch.Tensor, G: torch.Tensor, n_sweeps: int, tol: float | None = None) -> None:
    """In place: up to `n_sweeps` rounds of exact coordinate descent on the rows of X (K, m) >= 0.

    Minimises ||V - F X||_F^2 (or its transpose) for a fixed factor F, given only the data
    product P = F.T V (K, m), i.e. H @ V.T or W.T @ V, and the Gram matrix G = F.T F (K, K).
    Each row update is the exact minimiser along that row, clipped at 0:
        X[k] <- max(0, X[k] + (P[k] - G[k] @ X) / G[k, k]) = max(0, Ps[k] - Gs[k] @ X)
    with Ps = P / diag(G) and Gs = G / diag(G) with its diagonal zeroed, so each update is two
    kernels (matrix-vector product, clamp) whatever the device. A row of the fixed factor that
    is all zero (G[k, k] = 0) contributes nothing; its row of X is set to 0.
    With `tol`, it stops after the first sweep whose largest change of an entry is at most
    tol x the largest entry of X (a test that reads the device once per sweep).
    """
    diag = G.diagonal().clamp(min=torch.finfo(G.dtype).tiny).unsqueeze(1)
    Ps = P / diag
    Gs = (G / diag).fill_diagonal_(0)
    for _ in range(n_sweeps):
        before = X.clone() if tol is not None else None
        for k in range(X.shape[0]):
            torch.clamp(torch.addmv(Ps[k], X.T, Gs[k], alpha=-1.0), min=0, out=X[k])
        if before is not None and (
            X.numel() == 0 or float((X - before).abs().max()) <= tol * max(float(X.max()), 1e-30)
        ):
            break


def nnls_rows(
    V: torch.Tensor,
    H: torch.Tensor,
    *,
    n_iter: int = NNLS_SWEEPS,
    tol: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Non-negative least squares of each row of V against fixed H: argmin_w>=0 ||v - w H||.

    V: (n, C), H: (K, C), both on the same device. Returns W (n, K) in `dtype` on V's device.
    Starts from the clipped unconstrained solution and runs coordinate sweeps (`_sweep_rows`):
    - tol=None (the full pass): exactly `n_iter` sweeps; no data-dependent branching, so it never
      waits on the GPU (safe inside a forward hook);
    - tol given (the K grid): until the largest change of a weight in one sweep is at most
      tol x the largest weight, at most `n_iter` sweeps; with dtype=torch.float64 this solves to
      convergence (NNLS_TOL, NNLS_MAX_SWEEPS).
    Runs in `dtype` even under autocast, and without autograd.
    """
    V = V.detach().to(dtype)
    H = H.detach().to(device=V.device, dtype=dtype)
    K = H.shape[0]
    # A hook may run under bf16/fp16 autocast: the solve needs full-precision products.
    with torch.autocast(V.device.type, enabled=False), torch.no_grad():
        G = H @ H.T  # (K, K)
        P = H @ V.T  # (K, n)
        # A tiny ridge keeps the solve defined when prototypes are collinear or all-zero;
        # the sweeps below then remove its (negligible) bias.
        ridge = 1e-6 * G.diagonal().mean() + torch.finfo(dtype).tiny
        eye = torch.eye(K, device=V.device, dtype=dtype)
        X = torch.linalg.solve_ex(G + ridge * eye, P)[0]
        X = torch.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0)
        _sweep_rows(X, P, G, n_iter, tol)
    return X.T.contiguous()


def nnls_converged(X: Any, H: Any, *, batch_rows: int = 8192) -> np.ndarray:
    """NNLS of every row of X (N, C) against H (K, C), solved to convergence: W (N, K) float64.

    `nnls_rows` in float64 on the CPU with tol=NNLS_TOL and at most NNLS_MAX_SWEEPS sweeps,
    `batch_rows` rows at a time, so only one (batch_rows, C) float64 block exists at once;
    X may be any row-sliceable matrix (numpy, memmap, h5py). For the K grid, whose errors and
    R^2 compare K values and must not carry the full pass's fixed-sweep approximation.
    """
    Ht = torch.from_numpy(np.asarray(H, dtype=np.float64))
    out = np.empty((X.shape[0], Ht.shape[0]), dtype=np.float64)
    for start in range(0, X.shape[0], batch_rows):
        block = torch.from_numpy(np.asarray(X[start : start + batch_rows], dtype=np.float64))
        out[start : start + batch_rows] = nnls_rows(
            block, Ht, n_iter=NNLS_MAX_SWEEPS, tol=NNLS_TOL, dtype=torch.float64
        ).numpy()
    return out


def relative_error(V: Any, W: Any, H: Any) -> float:
    """||V - W H||_F / ||V||_F for V (n, C), W (n, K), H (K, C) (numpy or torch).

    Computed from K x K / K x C products, so no (n, C) residual is materialised.
    """
    V = _to_tensor(V, None, "V")
    W = _to_tensor(W, V.device, "W")
    H = _to_tensor(H, V.device, "H")
    vv = _scan(V, "V")
    P = (W.T @ V).double()  # (K, C)
    G = (W.T @ W).double()
    Hd = H.double()
    sq = vv - 2.0 * float((P * Hd).sum()) + float((G * (Hd @ Hd.T)).sum())
    return float(np.sqrt(max(sq, 0.0) / vv)) if vv > 0 else 0.0


class TorchNMF:
    """NMF with the Frobenius loss, NNDSVD start and HALS updates, on CPU or GPU.

    After `fit`: `components_` (K, C) float32 numpy (the cluster prototypes H),
    `reconstruction_err_` = ||V - WH||_F / ||V||_F (relative, unlike scikit-learn's absolute
    value), `n_iter_` outer iterations. `transform` solves W for new rows with H fixed.
    """

    def __init__(
        self,
        n_components: int = 6,
        *,
        max_iter: int = 500,
        tol: float = 1e-4,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        if int(n_components) < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}.")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
        self.n_components = int(n_components)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else _default_device()
        self.components_: np.ndarray | None = None
        self.reconstruction_err_: float | None = None
        self.n_iter_: int = 0

    @classmethod
    def from_components(cls, H: Any, **kwargs: Any) -> "TorchNMF":
        """Model with fixed prototypes H (K, C) from an earlier atlas, ready for `transform`."""
        H = np.array(H, dtype=np.float32, copy=True)
        if H.ndim != 2:
            raise ValueError(f"H must be a (K, C) matrix, got shape {H.shape}.")
        if not np.isfinite(H).all() or (H < 0).any():
            raise ValueError("H must be finite and non-negative (rows of an NMF components_ matrix).")
        model = cls(H.shape[0], **kwargs)
        model.components_ = H
        return model

    def fit(self, V: Any) -> "TorchNMF":
        """Fit W, H to V (n, C) >= 0 (numpy or torch); keeps H as `components_`."""
        V = _to_tensor(V, self.device, "V")
        n, c = V.shape
        K = self.n_components
        if K > min(n, c):
            raise ValueError(
                f"n_components={K} is larger than min(rows, channels) = min({n}, {c}); "
                "use fewer components or more activation rows."
            )
        vv = _scan(V, "V")
        if vv == 0:
            raise ValueError("V is all zeros (no activation anywhere); there is nothing to factorise.")

        W, H = nndsvd(V, K, seed=self.seed)
        Wt = W.T.contiguous()  # (K, n): each column of W is one contiguous row here
        err_prev = np.inf
        err = 1.0
        it = 0
        for it in range(1, self.max_iter + 1):
            _sweep_rows(Wt, H @ V.T, H @ H.T, _W_SWEEPS)
            P = Wt @ V  # (K, C) = W.T V
            G = Wt @ Wt.T
            _sweep_rows(H, P, G, _H_SWEEPS)
            # Error from K x C / K x K summaries: ||V||^2 - 2<W.T V, H> + <W.T W, H H.T>.
            Pd, Gd, Hd = P.double(), G.double(), H.double()
            sq = vv - 2.0 * float((Pd * Hd).sum()) + float((Gd * (Hd @ Hd.T)).sum())
            err = float(np.sqrt(max(sq, 0.0) / vv))
            if err_prev - err < self.tol * err:
                break
            err_prev = err

        self.components_ = H.cpu().numpy()
        self.reconstruction_err_ = err
        self.n_iter_ = it
        return self

    def transform(self, V: Any, *, batch_rows: int = 65536, n_iter: int = NNLS_SWEEPS) -> np.ndarray:
        """Cluster weights W (n, K) float32 for rows V (n, C) >= 0, H fixed, batch by batch."""
        if self.components_ is None:
            raise RuntimeError("TorchNMF is not fitted: call fit(V) or TorchNMF.from_components(H) first.")
        H = torch.from_numpy(self.components_).to(self.device)
        if not hasattr(V, "shape"):
            V = np.asarray(V)
        n = V.shape[0]
        # Any row-sliceable matrix works (numpy, torch, memmap, h5py): only one batch is loaded.
        if len(V.shape) != 2 or V.shape[1] != H.shape[1]:
            raise ValueError(
                f"V must have shape (n, {H.shape[1]}) to match the fitted components, got {tuple(V.shape)}."
            )
        out = np.empty((n, H.shape[0]), dtype=np.float32)
        for start in range(0, n, batch_rows):
            block = _to_tensor(V[start : start + batch_rows], self.device, "V")
            _scan(block, "V")
            out[start : start + batch_rows] = nnls_rows(block, H, n_iter=n_iter).cpu().numpy()
        return out

    def fit_transform(self, V: Any) -> np.ndarray:
        """`fit(V)` then `transform(V)`: W (n, K) float32."""
        return self.fit(V).transform(V)


def make_nonnegative(
    X: Any,
    *,
    low_pct: float = 0.01,
    stats: dict | None = None,
    sample_rows: int = 200_000,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Map signed activations X (n, C) to non-negative ones for NMF.

    Per channel: subtract the `low_pct` percentile (in percent: 0.01 = the 1-in-10,000 value),
    divide by the inter-quartile range, clamp at 0. With `stats` given (from an earlier call),
    the same shift and scale are applied, so every slide is mapped identically. Statistics are
    taken on a seeded sample of at most `sample_rows` rows. Returns (X' float32 (n, C), stats)
    where stats = {"low_pct", "shift" (C,), "scale" (C,)}.
    """
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D (rows, channels) matrix, got shape {X.shape}.")
    n, c = X.shape
    if stats is None:
        if not 0 <= low_pct < 25:
            raise ValueError(f"low_pct is a percentile in percent, below the lower quartile; got {low_pct}.")
        if n == 0:
            raise ValueError("X has no rows; cannot estimate per-channel percentiles.")
        rows = sample(n, sample_rows, seed)
        S = np.asarray(X[rows], dtype=np.float32)
        if not np.isfinite(S).all():
            raise ValueError("X contains NaN or infinite values; fix the activations before NMF.")
        low, q25, q75 = np.percentile(S, [low_pct, 25.0, 75.0], axis=0)
        iqr = q75 - q25
        # A channel with zero spread would divide by zero; leave its scale alone.
        scale = np.where(iqr > 0, iqr, 1.0)
        stats = {"low_pct": float(low_pct), "shift": low.astype(np.float32), "scale": scale.astype(np.float32)}
    shift = np.asarray(stats["shift"], dtype=np.float32)
    scale = np.asarray(stats["scale"], dtype=np.float32)
    if shift.shape != (c,) or scale.shape != (c,):
        raise ValueError(f"stats are for {shift.shape[0]} channels but X has {c}; use stats from the same layer.")
    out = np.empty((n, c), dtype=np.float32)
    for start in range(0, n, _CHECK_ROWS):
        block = np.asarray(X[start : start + _CHECK_ROWS], dtype=np.float32)
        np.maximum((block - shift) / scale, 0.0, out=out[start : start + _CHECK_ROWS])
    return out, stats
