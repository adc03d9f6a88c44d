"""Product-quantisation compression of weight matrices (METHODS.md §2.4).

A weight ``W`` (m x n; a conv weight flattened to ``out x in*kh*kw``) is split column-wise into
``n/s`` segments of width ``s``; k-means (scikit-learn) with ``k`` centres runs on the m rows of
each segment (or a batched torch k-means for big layers, ``backend="torch"``). Every row-segment
stores its centre index (uint8) and every segment its centres (float32): compression factor
``32mn / (32kn + 8mn/s)``.

``n`` not a multiple of ``s`` is zero-padded up to one (logged; the padding is dropped on
reconstruction). ``k`` larger than the number of rows ``m`` is clipped to ``m`` (every row then is
its own centre: exact); ``k`` above 256 does not fit uint8 codes and is an error.

``axis="columns"`` quantises ``W^T`` instead (segments of ``s`` rows, k-means on the ``n`` columns;
factor ``32mn / (32km + 8mn/s)``), as Gong et al. (2014), whose PQ HD-CNN uses, allow for either
dimension. Small layers need it: with few rows (a 96-channel conv) the ``k`` centres of the row
orientation cost as much as the weights, while its 864 columns leave room for 4x and more.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits
from torch import Tensor

from coarse2fine.errors import ModelError

log = logging.getLogger(__name__)

MAX_K = 256  # uint8 codes

AXES = ("rows", "columns")  # which vectors k-means clusters: W's row segments (METHODS.md §2.4) or W^T's
LayerSpec = tuple[int, int] | tuple[int, int, str]  # (s, k[, axis])
Spec = Mapping[str, LayerSpec]


def compression_factor(m: int, n: int, s: int, k: int, axis: str = "rows") -> float:
    """``32mn / (32kn + 8mn/s)`` (METHODS.md §2.4): fp32 weight bits over fp32 centres + uint8 code bits.

    ``axis="columns"`` (``W^T`` quantised): ``32mn / (32km + 8mn/s)``.
    """
    _check_axis(axis)
    if axis == "columns":
        m, n = n, m
    return 32.0 * m * n / (32.0 * k * n + 8.0 * m * n / s)


def _check_axis(axis: str, where: str = "") -> str:
    if axis not in AXES:
        at = f" for {where}" if where else ""
        raise ModelError(f"product quantisation{at}: axis must be one of {', '.join(AXES)}, got {axis!r}")
    return axis


def oriented(m: int, n: int, axis: str) -> tuple[int, int]:
    """``(points, dims)`` of the quantised matrix: ``(m, n)`` for ``rows``, ``(n, m)`` for ``columns``."""
    return (n, m) if _check_axis(axis) == "columns" else (m, n)


def _check_sk(m: int, s: int, k: int, where: str = "") -> int:
    """Validate ``s`` and ``k``; return the effective ``k`` (clipped to the row count)."""
    at = f" for {where}" if where else ""
    if not isinstance(s, int) or s < 1:
        raise ModelError(f"product quantisation{at}: segment width s must be a positive integer, got {s!r}")
    if not isinstance(k, int) or k < 1:
        raise ModelError(f"product quantisation{at}: number of centres k must be a positive integer, got {k!r}")
    if k > MAX_K:
        raise ModelError(f"product quantisation{at}: k={k} does not fit uint8 codes (at most {MAX_K})")
    if k > m:
        log.info("product quantisation%s: k=%d clipped to the %d rows", at, k, m)
    return min(k, m)


def _as_matrix(W: Tensor | np.ndarray) -> np.ndarray:
    w = W.detach().float().cpu().numpy() if isinstance(W, Tensor) else np.asarray(W, dtype=np.float32)
    if w.ndim < 2:
        raise ModelError(f"product quantisation needs a matrix or a conv weight, got shape {tuple(w.shape)}")
    return np.ascontiguousarray(w.reshape(w.shape[0], -1), dtype=np.float32)


BACKENDS = ("sklearn", "torch")


def product_quantize(
    W: Tensor | np.ndarray,
    s: int,
    k: int,
    seed: int = 0,
    *,
    n_init: int = 1,
    max_iter: int = 100,
    backend: str = "sklearn",
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantise ``W`` (m x n, or a conv weight, flattened to ``out x in*kh*kw``).

    Returns ``codes`` uint8 ``(m, ceil(n/s))`` and ``centers`` float32 ``(ceil(n/s), k', s)`` with
    ``k' = min(k, m)``. A segment with at most ``k'`` distinct rows is stored exactly.
    ``backend="sklearn"`` (default): scikit-learn ``KMeans`` per segment (k-means++, ``n_init``).
    ``backend="torch"``: the same Lloyd iterations from a k-means++ start, run for many segments at
    once as batched tensor operations on ``device`` (default: the weight's) -- for layers with
    thousands of segments (VGG fc6: 1792), where one scikit-learn fit per segment is slow.
    """
    if backend not in BACKENDS:
        raise ModelError(f"product quantisation: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    w = _as_matrix(W)
    m, n = w.shape
    k_eff = _check_sk(m, s, k)
    segs = math.ceil(n / s)
    if segs * s != n:
        log.info("product quantisation: %d columns zero-padded to %d (a multiple of s=%d)", n, segs * s, s)
        w = np.pad(w, ((0, 0), (0, segs * s - n)))
    codes = np.empty((m, segs), dtype=np.uint8)
    centers = np.zeros((segs, k_eff, s), dtype=np.float32)
    if backend == "torch":
        dev = torch.device(device) if device is not None else (W.device if isinstance(W, Tensor) else None)
        _kmeans_torch(w, s, k_eff, seed, max_iter, codes, centers, dev or torch.device("cpu"))
        return torch.from_numpy(codes), torch.from_numpy(centers)
    with threadpool_limits(limits=1), warnings.catch_warnings():  # one small k-means per segment
        warnings.simplefilter("ignore", ConvergenceWarning)
        for g in range(segs):
            _quantize_segment(w[:, g * s : (g + 1) * s], k_eff, seed + g, codes[:, g], centers[g], n_init, max_iter)
    return torch.from_numpy(codes), torch.from_numpy(centers)


def _kmeans_torch(
    w: np.ndarray,
    s: int,
    k: int,
    seed: int,
    max_iter: int,
    codes: np.ndarray,
    centers: np.ndarray,
    device: torch.device,
) -> None:
    """Batched k-means (k-means++ start, Lloyd steps) over segment chunks; writes codes / centres.

    An emptied cluster keeps its previous centre. Segments with at most ``k`` distinct rows are
    stored exactly afterwards (as with the scikit-learn backend).
    """
    m = w.shape[0]
    segs = centers.shape[0]
    x_all = torch.from_numpy(w).to(device).view(m, segs, s).permute(1, 0, 2).contiguous()  # (G, m, s)
    gen = torch.Generator(device=device).manual_seed(seed)
    chunk = max(1, (1 << 26) // max(m * k, 1))  # bound the (chunk, m, k) distance tensor
    for start in range(0, segs, chunk):
        x = x_all[start : start + chunk]
        g = x.shape[0]
        rows = torch.arange(g, device=device)
        # k-means++ start
        first = torch.randint(0, m, (g,), device=device, generator=gen)
        c = torch.empty(g, k, s, device=device)
        c[:, 0] = x[rows, first]
        d2 = (x - c[:, :1]).pow(2).sum(-1)  # (g, m)
        for j in range(1, k):
            pick = torch.multinomial(d2 + 1e-12, 1, generator=gen).squeeze(1)
            c[:, j] = x[rows, pick]
            d2 = torch.minimum(d2, (x - c[:, j : j + 1]).pow(2).sum(-1))
        assign = torch.full((g, m), -1, dtype=torch.long, device=device)
        for _ in range(max_iter):
            new = torch.cdist(x, c).argmin(-1)  # (g, m)
            if torch.equal(new, assign):
                break
            assign = new
            sums = torch.zeros_like(c).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, s), x)
            counts = torch.zeros(g, k, device=device).scatter_add_(1, assign, torch.ones_like(x[..., 0]))
            c = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), c)
        assign = torch.cdist(x, c).argmin(-1)
        codes[:, start : start + g] = assign.T.to(torch.uint8).cpu().numpy()
        centers[start : start + g] = c.cpu().numpy()
        # distinct rows per segment, from a random projection (collisions only undercount): segments
        # that may have at most k distinct rows are checked exactly and stored exactly
        proj = (x.double() @ torch.randn(s, 1, device=device, dtype=torch.float64, generator=gen)).squeeze(-1)
        distinct = 1 + (proj.sort(dim=1).values.diff(dim=1) != 0).sum(1)
        for gi in (torch.nonzero(distinct <= k).flatten() + start).tolist():
            block = w[:, gi * s : (gi + 1) * s]
            uniq, inverse = np.unique(block, axis=0, return_inverse=True)
            if uniq.shape[0] <= k:
                centers[gi, : uniq.shape[0]] = uniq
                centers[gi, uniq.shape[0] :] = uniq[-1]
                codes[:, gi] = inverse.reshape(-1)


def _quantize_segment(
    block: np.ndarray, k: int, seed: int, codes: np.ndarray, centers: np.ndarray, n_init: int, max_iter: int
) -> None:
    """k-means of one column segment's rows, written into ``codes`` (m,) and ``centers`` (k, s)."""
    uniq, inverse = np.unique(block, axis=0, return_inverse=True)
    if uniq.shape[0] <= k:  # exact
        centers[: uniq.shape[0]] = uniq
        centers[uniq.shape[0] :] = uniq[-1]
        codes[:] = inverse.reshape(-1)
        return
    km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed)
    codes[:] = km.fit_predict(block)
    centers[:] = km.cluster_centers_


def reconstruct(codes: Tensor, centers: Tensor, n: int | None = None) -> Tensor:
    """The quantised matrix ``(m, n)``: row-segment ``(i, g)`` is ``centers[g, codes[i, g]]``.

    ``n`` (default ``segments * s``) drops the zero padding.
    """
    segs, _, s = centers.shape
    if codes.dim() != 2 or codes.shape[1] != segs:
        raise ModelError(f"codes of shape {tuple(codes.shape)} do not match {segs} segments of centres")
    idx = codes.long()
    w = centers[torch.arange(segs, device=centers.device).unsqueeze(0), idx]  # (m, segs, s)
    w = w.reshape(codes.shape[0], segs * s)
    return w if n is None else w[:, :n]


def dequantise(codes: Tensor, centers: Tensor, dims: int, axis: str = "rows") -> Tensor:
    """The weight matrix of codes / centres: :func:`reconstruct` to ``dims`` columns, transposed back
    for ``axis="columns"`` (``(m, n)`` either way)."""
    w = reconstruct(codes, centers, dims)
    return w.t().contiguous() if axis == "columns" else w


def pq_buffers(m: int, n: int, s: int, k: int, axis: str) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Shapes of the uint8 codes and fp32 centres of an ``(m, n)`` weight quantised with ``(s, k, axis)``."""
    points, dims = oriented(m, n, axis)
    segs = math.ceil(dims / s)
    return (points, segs), (segs, k, s)


def relative_error(W: Tensor, W_hat: Tensor) -> float:
    """``||W - W_hat||_F / ||W||_F``."""
    W = W.detach().float().reshape(W.shape[0], -1)
    W_hat = W_hat.detach().float().reshape(W.shape[0], -1).to(W.device)
    return float(torch.linalg.norm(W - W_hat) / torch.linalg.norm(W).clamp_min(1e-12))


