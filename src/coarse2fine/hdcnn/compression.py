"""Product-quantisation compression of weight matrices (SPEC 2.4, HD-CNN's layer compression).

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
dimension. Small layers need it: with few rows (a 96-channel conv) the ``k`` centres of the SPEC
orientation cost as much as the weights, while its 864 columns leave room for 4x and more.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from coarse2fine.errors import ModelError

log = logging.getLogger(__name__)

MAX_K = 256  # uint8 codes

AXES = ("rows", "columns")  # which vectors k-means clusters: W's row segments (SPEC) or W^T's
LayerSpec = tuple[int, int] | tuple[int, int, str]  # (s, k[, axis])
Spec = Mapping[str, LayerSpec]


def compression_factor(m: int, n: int, s: int, k: int, axis: str = "rows") -> float:
    """``32mn / (32kn + 8mn/s)`` (SPEC 2.4): fp32 weight bits over fp32 centres + uint8 code bits.

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


class _PQMixin(nn.Module):
    """Holds ``codes`` (uint8 buffer) and ``centers`` (fp32 buffer); rebuilds the weight.

    In eval mode the rebuilt weight is cached after the first forward; the cache is dropped on
    ``train()``, ``load_state_dict`` and device / dtype moves.
    """

    codes: Tensor
    centers: Tensor

    def _init_pq(self, m: int, n: int, s: int, k: int, axis: str = "rows") -> None:
        """Buffers for a ``(m, n)`` weight; ``axis="columns"`` stores the codes of ``W^T``."""
        codes, centers = pq_buffers(m, n, s, k, axis)
        self.s, self.k, self.n, self.axis = s, k, oriented(m, n, axis)[1], axis
        self.register_buffer("codes", torch.zeros(codes, dtype=torch.uint8))
        self.register_buffer("centers", torch.zeros(centers, dtype=torch.float32))
        self._cached: Tensor | None = None

    def set_quantized(self, codes: Tensor, centers: Tensor) -> None:
        if codes.shape != self.codes.shape or centers.shape != self.centers.shape:
            raise ModelError(
                f"quantised tensors {tuple(codes.shape)}, {tuple(centers.shape)} do not fit "
                f"{tuple(self.codes.shape)}, {tuple(self.centers.shape)}"
            )
        with torch.no_grad():
            self.codes.copy_(codes)
            self.centers.copy_(centers)
        self._cached = None

    def weight_matrix(self) -> Tensor:
        c = self._cached
        # an inference-mode tensor cannot take part in autograd: rebuilt outside inference mode
        if c is not None and not self.training and (torch.is_inference_mode_enabled() or not c.is_inference()):
            return c
        w = dequantise(self.codes, self.centers, self.n, self.axis)
        if not self.training:
            self._cached = w
        return w

    def train(self, mode: bool = True) -> _PQMixin:
        self._cached = None
        return super().train(mode)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> _PQMixin:
        self._cached = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cached = None
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def compressed_bytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.centers.numel() * self.centers.element_size()


class PQLinear(_PQMixin):
    """``nn.Linear`` whose weight is product-quantised (SPEC 2.4)."""

    def __init__(
        self, in_features: int, out_features: int, s: int, k: int, bias: bool = True, axis: str = "rows"
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_pq(out_features, in_features, s, k, axis)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight(self) -> Tensor:
        return self.weight_matrix()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_matrix().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, s={self.s}, k={self.k}, "
            f"axis={self.axis}"
        )

    @classmethod
    def empty_like(cls, layer: nn.Linear, s: int, k: int, axis: str = "rows") -> PQLinear:
        k = _check_sk(oriented(layer.out_features, layer.in_features, axis)[0], s, k)
        return cls(layer.in_features, layer.out_features, s, k, bias=layer.bias is not None, axis=axis)


class PQConv2d(_PQMixin):
    """``nn.Conv2d`` whose weight (flattened ``out x in/groups*kh*kw``) is product-quantised (SPEC 2.4)."""

    def __init__(self, conv: nn.Conv2d, s: int, k: int, axis: str = "rows") -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding = list(getattr(conv, "_reversed_padding_repeated_twice", []))
        self.weight_shape = tuple(conv.weight.shape)
        n = int(np.prod(self.weight_shape[1:]))
        self._init_pq(self.out_channels, n, s, k, axis)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if conv.bias is not None else None

    @property
    def weight(self) -> Tensor:
        return self.weight_matrix().view(self.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, s={self.s}, k={self.k}, axis={self.axis}"
        )

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, s: int, k: int, axis: str = "rows") -> PQConv2d:
        m, n = _layer_dims(conv)
        return cls(conv, s, _check_sk(oriented(m, n, axis)[0], s, k), axis)


@dataclass
class LayerReport:
    name: str
    kind: str  # linear | conv2d
    shape: list[int]  # original weight shape
    m: int
    n: int
    s: int
    k: int  # effective k (clipped to m)
    padded_n: int  # quantised dimension after zero padding (n, or m for axis="columns")
    factor: float  # SPEC formula on (m, n, s, k, axis)
    bytes_before: int  # fp32 weight
    bytes_after: int  # uint8 codes + fp32 centres
    rel_error: float  # ||W - W_hat||_F / ||W||_F
    axis: str = "rows"  # rows: SPEC orientation; columns: W^T quantised


@dataclass
class CompressionReport:
    """What :func:`compress_model` did, per layer and for the whole model."""

    layers: list[LayerReport] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def model_factor(self) -> float:
        return self.model_bytes_before / max(self.model_bytes_after, 1)

    def spec(self) -> dict[str, list[Any]]:
        """``{layer: [s, k]}`` (effective k; ``[s, k, "columns"]`` for ``W^T``), JSON-able: rebuilds the
        structure with :func:`apply_compression_structure`."""
        return {r.name: [r.s, r.k] + ([r.axis] if r.axis != "rows" else []) for r in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
            "model_factor": self.model_factor,
        }

    def table(self) -> str:
        """Markdown table of the layers and the model totals."""
        rows = [
            "| layer | shape | axis | s | k | factor | bytes before | bytes after | rel. error |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.layers:
            rows.append(
                f"| {r.name} | {'x'.join(map(str, r.shape))} | {r.axis} | {r.s} | {r.k} | {r.factor:.2f}x | "
                f"{r.bytes_before:,} | {r.bytes_after:,} | {r.rel_error:.4f} |"
            )
        rows.append(
            f"| **model** | | | | | {self.model_factor:.2f}x | {self.model_bytes_before:,} | "
            f"{self.model_bytes_after:,} | |"
        )
        return "\n".join(rows)


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def state_bytes(model: nn.Module) -> int:
    """Bytes of the ``state_dict`` tensors: what a checkpoint stores (quantised weights as codes + centres)."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, Tensor)))


def _owner_of(model: nn.Module, name: str) -> tuple[Any, str] | None:
    """The submodule that quantises tensor ``name`` itself (``apply_pq_structure``, e.g. HD-CNN's stacked
    fine components) and the tensor's name inside it, or None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        if hasattr(owner, "apply_pq_structure"):
            return owner, ".".join(parts[i:])
    return None


def _layer_dims(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return int(w.shape[0]), int(w[0].numel())


def auto_k(m: int, k_max: int, ratio: float) -> int:
    """Centres for a layer with ``m`` rows: ``ceil(ratio * m)``, at most ``k_max``, at least 2."""
    return max(2, min(k_max, math.ceil(ratio * m)))


def auto_spec(
    model: nn.Module,
    *,
    linear: LayerSpec = (4, 256),
    conv: LayerSpec = (3, 128),
    linear_ratio: float = 0.25,
    conv_ratio: float = 2 / 3,
    min_factor: float = 1.3,
    min_params: int = 4096,
    skip: tuple[str, ...] = (),
    axis: str = "rows",
) -> dict[str, LayerSpec]:
    """Default rule. Every ``nn.Linear`` gets ``s, k_max = linear`` (the paper's fc7 setting) and every
    ``nn.Conv2d`` with a kernel larger than 1x1 gets ``conv`` (the paper's NIN setting: s=3, k=128 for
    192 rows), with ``k = auto_k(points, k_max, ratio)``: at most a quarter of a linear layer's rows and
    two thirds of a conv's (on a small Fashion-MNIST VGG, k = a quarter of the conv rows lost 55 points
    of accuracy, two thirds about 1). A layer is kept when it has at least ``min_params`` weights and
    its SPEC factor is at least ``min_factor``. ``axis``: ``rows`` (SPEC), ``columns`` (``W^T``) or
    ``auto`` (per layer, the side with more vectors to cluster: columns when ``n > m``).
    """
    spec: dict[str, LayerSpec] = {}
    for name, mod in model.named_modules():
        if name in skip or isinstance(mod, _PQMixin):
            continue
        if isinstance(mod, nn.Linear):
            (s, k_max), ratio = linear, linear_ratio
        elif isinstance(mod, nn.Conv2d) and mod.weight[0, 0].numel() > 1:
            (s, k_max), ratio = conv, conv_ratio
        else:
            continue
        m, n = _layer_dims(mod)
        ax = ("columns" if n > m else "rows") if axis == "auto" else _check_axis(axis)
        k = auto_k(oriented(m, n, ax)[0], k_max, ratio)
        if m * n >= min_params and compression_factor(m, n, s, k, ax) >= min_factor:
            spec[name] = (s, k) if ax == "rows" else (s, k, ax)
    return spec


def _parse_sk(name: str, sk: Any) -> tuple[int, int, str]:
    """``(s, k)`` or ``(s, k, axis)`` of layer ``name`` -> ``(s, k, axis)`` (axis ``rows`` by default)."""
    try:
        if isinstance(sk, str) or len(sk) not in (2, 3):
            raise ValueError
        s, k = int(sk[0]), int(sk[1])
        axis = str(sk[2]) if len(sk) == 3 else "rows"
    except (TypeError, ValueError) as exc:
        raise ModelError(f"compression: layer {name!r} needs (s, k) or (s, k, axis), got {sk!r}") from exc
    return s, k, _check_axis(axis, name)


def _resolve_spec(model: nn.Module, spec: Spec | str | None) -> dict[str, tuple[int, int, str]]:
    if spec is None or spec == "auto":
        spec = auto_spec(model)
    if isinstance(spec, str):
        raise ModelError(f"compression spec {spec!r}: expected 'auto' or a mapping layer -> (s, k)")
    modules = dict(model.named_modules())
    out: dict[str, tuple[int, int, str]] = {}
    for name, sk in spec.items():
        if name not in modules:
            layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d, _PQMixin))]
            raise ModelError(f"compression: no layer named {name!r}; weight layers: {', '.join(layers)}")
        mod = modules[name]
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise ModelError(f"compression: layer {name!r} is a {type(mod).__name__}, not Linear or Conv2d")
        s, k, axis = _parse_sk(name, sk)
        out[name] = (s, _check_sk(oriented(*_layer_dims(mod), axis)[0], s, k, name), axis)
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _empty_pq(mod: nn.Module, s: int, k: int, axis: str) -> _PQMixin:
    if isinstance(mod, nn.Linear):
        return PQLinear.empty_like(mod, s, k, axis)
    if isinstance(mod, nn.Conv2d):
        return PQConv2d.empty_like(mod, s, k, axis)
    raise ModelError(f"compression: {type(mod).__name__} is not Linear or Conv2d")


def compress_model(
    model: nn.Module,
    spec: Spec | str | None = "auto",
    *,
    seed: int = 0,
    backend: str = "sklearn",
    device: str | torch.device | None = None,
) -> CompressionReport:
    """Replace the layers named in ``spec`` (``{name: (s, k[, axis])}``, or ``"auto"`` = :func:`auto_spec`) by
    :class:`PQLinear` / :class:`PQConv2d` in place and report sizes and reconstruction errors.
    ``backend`` / ``device``: the k-means implementation (see :func:`product_quantize`).
    """
    layers = _resolve_spec(model, spec)
    if not layers:
        raise ModelError("compression: no layer to compress (empty spec, or no layer fits the auto rule)")
    report = CompressionReport(model_bytes_before=model_bytes(model))
    modules = dict(model.named_modules())
    for name, (s, k, axis) in layers.items():
        mod = modules[name]
        weight = mod.weight.detach()
        m, n = _layer_dims(mod)
        matrix = weight.reshape(m, n)
        quantised = matrix.t() if axis == "columns" else matrix
        codes, centers = product_quantize(quantised, s, k, seed, backend=backend, device=device)
        new = _empty_pq(mod, s, k, axis)
        new.set_quantized(codes, centers)
        if mod.bias is not None:
            with torch.no_grad():
                new.bias.copy_(mod.bias.detach())
        new.to(weight.device)
        new.train(mod.training)
        _set_module(model, name, new)
        err = relative_error(quantised, reconstruct(codes, centers, quantised.shape[1]))
        report.layers.append(
            LayerReport(
                name=name,
                kind="linear" if isinstance(mod, nn.Linear) else "conv2d",
                shape=list(weight.shape),
                m=m,
                n=n,
                s=s,
                k=new.k,
                padded_n=centers.shape[0] * s,
                factor=compression_factor(m, n, s, new.k, axis),
                bytes_before=weight.numel() * weight.element_size(),
                bytes_after=new.compressed_bytes,
                rel_error=err,
                axis=axis,
            )
        )
    report.model_bytes_after = model_bytes(model)
    return report


def apply_compression_structure(model: nn.Module, report_or_spec: CompressionReport | Mapping[str, Any]) -> nn.Module:
    """Swap the named layers of a freshly built (uncompressed) ``model`` for empty PQ layers of the
    same geometry, so that a compressed ``state_dict`` (uint8 codes) loads into it.

    Accepts a :class:`CompressionReport`, its :meth:`~CompressionReport.spec`, or its ``to_dict()``.
    A tensor owned by a submodule with ``apply_pq_structure`` (HD-CNN's stacked fine components,
    ``fine.<layer>.weight``) gets its code and centre buffers from that submodule.
    """
    if isinstance(report_or_spec, CompressionReport):
        spec: Mapping[str, Any] = report_or_spec.spec()
    elif "layers" in report_or_spec and isinstance(report_or_spec["layers"], list):
        spec = {r["name"]: (r["s"], r["k"], r.get("axis", "rows")) for r in report_or_spec["layers"]}
    else:
        spec = report_or_spec
    spec = dict(spec)
    modules = dict(model.named_modules())
    for name in [n for n in spec if n not in modules]:
        owned = _owner_of(model, name)
        if owned is not None:
            owner, inner = owned
            owner.apply_pq_structure(inner, *_parse_sk(name, spec.pop(name)))
    layers = _resolve_spec(model, spec) if spec else {}
    for name, (s, k, axis) in layers.items():
        mod = modules[name]
        new = _empty_pq(mod, s, k, axis)
        new.to(mod.weight.device)
        new.train(mod.training)
        _set_module(model, name, new)
    return model


def parse_layer_spec(items: list[str]) -> dict[str, LayerSpec]:
    """``["fc6=14:64", "fc7=4:256:columns"]`` -> ``{"fc6": (14, 64), "fc7": (4, 256, "columns")}``
    (command-line form; the axis is optional, ``rows`` by default)."""
    out: dict[str, LayerSpec] = {}
    for item in items:
        name, sep, sk = item.partition("=")
        parts = sk.split(":")
        try:
            if not (sep and name) or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in AXES):
                raise ValueError
            s, k = int(parts[0]), int(parts[1])
            out[name.strip()] = (s, k) if len(parts) == 2 else (s, k, parts[2])
        except ValueError as exc:
            raise ModelError(
                f"layer spec {item!r}: expected NAME=S:K or NAME=S:K:AXIS (axis rows or columns), "
                "e.g. classifier.0=4:256"
            ) from exc
    return out


def compression_of(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``{layer: [s, k]}`` spec a compressed checkpoint carries (``metadata["compression"]``), or None."""
    metadata = checkpoint.get("metadata") or {}
    spec = metadata.get("compression") if isinstance(metadata, Mapping) else None
    return dict(spec) if spec else None


def load_compressed_state(model: nn.Module, checkpoint: Mapping[str, Any]) -> nn.Module:
    """Load a compressed checkpoint into a freshly built ``model``: swap in the PQ layers named by
    ``checkpoint["metadata"]["compression"]`` (:func:`apply_compression_structure`), then load the
    state dict (uint8 codes, fp32 centres). A checkpoint without compression loads as it is.
    """
    spec = compression_of(checkpoint)
    if spec:
        apply_compression_structure(model, spec)
    model.load_state_dict(checkpoint.get("model", checkpoint))
    return model
