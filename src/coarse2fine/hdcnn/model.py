"""The HD-CNN network (METHODS.md §2.2, 2.4): shared layers, coarse component, K fine components.

Built from any building block of the model factory (a :class:`~coarse2fine.models.base.Backbone`)
and a category hierarchy (partial sets S_k of fine classes), branching at a named stage:

- shared layers = a deep copy of the block's preceding layers (up to ``branch_stage``);
- coarse component = a copy of the rear layers with the full C-way softmax B^f, followed by the
  fine-to-coarse aggregation B_ik = sum_{j: k in partial sets of j} B^f_ij, L1-normalised over k;
- fine components F_k = copies of the rear layers whose last classifier layer outputs |S_k| classes;
- probabilistic averaging p(j|x_i) = sum_k B_ik p_k(j|x_i) / sum_k B_ik over the components run.

The fine components have identical structure, so their parameters are stored *stacked* (leading
dimension: one slot per component) and, when all of them run, executed at once with ``torch.vmap``
over one template module (``fine_exec="vmap"``); ``"loop"`` runs them one after another (same
parameters, same result). Every component's last layer is stored padded to ``max_k |S_k|`` outputs;
the padding rows are masked to probability 0 and receive no gradient.

The aggregation (12) and the probabilistic averaging (13) run in fp32 with autocast disabled, also
when the layers run under bf16/fp16 autocast: their rows sum to 1 and the threshold of (17) compares
fp32 probabilities.

Conditional execution (METHODS.md §2.4): at inference with ``beta`` set, B_ik < 1/(beta K) is set to 0
and F_k runs only on the sub-batch of images that still need it (``index_select`` in,
``index_add_`` out; no Python loop over images).

A partial set of one class needs no network (p_k = 1 on its class): it has no F_k. The stack holds
the components of the partial sets with more than one class only (``runnable``; slot i of the stack
is partial set ``runnable[i]``), so a one-class set is never stored, run, counted or compressed.
Checkpoints of the earlier layout (one slot per partial set, plain or product-quantised) load: a
``load_state_dict`` pre-hook drops the one-class slots (:meth:`HDCNN.convert_state_dict`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from coarse2fine.compress.quantize import dequantise, oriented, pq_buffers
from coarse2fine.errors import HierarchyError, ModelError

log = logging.getLogger(__name__)

LOG_CLAMP = 1e-12  # p is clamped to this before the log returned as "logits"
FINE_EXEC = ("auto", "vmap", "loop")


# ---- generic helpers on the rear layers ------------------------------------------------------------


def find_classifier(module: nn.Module) -> tuple[str, nn.Module]:
    """The last ``nn.Linear`` or 1x1 ``nn.Conv2d`` of ``module`` (in registration order).

    This is the layer whose outputs are the classes: for VGG/ResNet heads a Linear, for NIN the
    final 1x1 convolution before global pooling.
    """
    found: tuple[str, nn.Module] | None = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) or (
            isinstance(sub, nn.Conv2d) and tuple(sub.kernel_size) == (1, 1) and sub.groups == 1
        ):
            found = (name, sub)
    if found is None:
        raise ModelError(f"no nn.Linear or 1x1 nn.Conv2d classifier found in the rear layers ({type(module).__name__})")
    return found


def _resized_classifier(layer: nn.Module, out_features: int) -> nn.Module:
    """A freshly initialised copy of the classifier ``layer`` with ``out_features`` outputs."""
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(layer.in_features, out_features, bias=layer.bias is not None)
    else:
        assert isinstance(layer, nn.Conv2d)
        new = nn.Conv2d(layer.in_channels, out_features, 1, bias=layer.bias is not None)
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype)


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def split_block(block: nn.Module, stage: str) -> tuple[nn.Module, nn.Module]:
    """``block.split(stage)`` -> (preceding, rear); ModelError listing the stages if ``stage`` is unknown."""
    if not callable(getattr(block, "split", None)):
        raise ModelError(f"HD-CNN needs a Backbone with split(stage); got {type(block).__name__}")
    return block.split(stage)


def _mangle(name: str) -> str:
    return name.replace(".", "__")


def _no_autocast(t: Tensor) -> torch.autocast:
    """Autocast disabled on ``t``'s device: the probability arithmetic runs in the dtype it is given (fp32)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


# ---- the stacked fine components ------------------------------------------------------------------


class FineComponents(nn.Module):
    """K structurally identical fine components with stacked parameters (leading dim K).

    ``template`` is a parameter-free (meta-device) copy of one component used by
    ``torch.func.functional_call``; it is not registered, so it is not in ``state_dict``.
    """

    def __init__(self, components: Sequence[nn.Module], exec_mode: str = "auto") -> None:
        super().__init__()
        self.num_components = len(components)
        params, buffers = stack_module_state(list(components))
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        # 4-D per-component tensors (conv weights) are stored as (K*out, in, kh, kw) so that
        # ``module.to(memory_format=torch.channels_last)`` applies to them; ``stacked`` views them as 5-D.
        self._folded = {n: int(v.shape[1]) for n, v in {**params, **buffers}.items() if v.dim() == 5}
        for name, value in params.items():
            self.register_parameter(_mangle(name), nn.Parameter(self._fold(name, value.detach().clone())))
        for name, value in buffers.items():
            self.register_buffer(_mangle(name), self._fold(name, value.detach().clone()))
        template = copy.deepcopy(components[0]).to("meta")
        object.__setattr__(self, "template", template)
        self.exec_mode = exec_mode
        self._vmap_ok: bool | None = None
        self.set_exec(exec_mode)
        # product-quantised stacked weights (METHODS.md §2.4): name -> (s, k, axis). Their codes / centres are
        # buffers and replace the fp32 tensor in ``state_dict``; the fp32 tensor keeps the dequantised
        # values for computing and is rebuilt from the codes on ``load_state_dict``.
        self._pq: dict[str, tuple[int, int, str]] = {}
        self._register_state_dict_hook(_drop_quantised)
        self._register_load_state_dict_pre_hook(self._dequantise_on_load)

    def set_exec(self, exec_mode: str) -> None:
        """``auto`` (vmap on GPU, loop on CPU; a loop if vmap fails), ``vmap`` or ``loop`` for all components."""
        if exec_mode not in FINE_EXEC:
            raise ModelError(f"hdcnn fine_exec {exec_mode!r} is not one of {FINE_EXEC}")
        self.exec_mode = exec_mode
        self._vmap_ok = None if exec_mode == "auto" else exec_mode == "vmap"

    def train(self, mode: bool = True) -> FineComponents:
        super().train(mode)
        self.template.train(mode)
        return self

    def _fold(self, name: str, value: Tensor) -> Tensor:
        return value.flatten(0, 1) if name in self._folded else value

    def _unfold(self, name: str) -> Tensor:
        value = getattr(self, _mangle(name))
        if name in self._folded:
            return value.unflatten(0, (self.num_components, self._folded[name]))
        return value

    def stacked(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(params, buffers) keyed by the template's names, each with leading dimension K (views)."""
        params = {n: self._unfold(n) for n in self._param_names}
        buffers = {n: self._unfold(n) for n in self._buffer_names}
        return params, buffers

    def state_of(self, k: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Component ``k``'s parameters and buffers (views into the stacked tensors)."""
        params, buffers = self.stacked()
        return {n: p[k] for n, p in params.items()}, {n: b[k] for n, b in buffers.items()}

    def forward_one(self, k: int, h: Tensor) -> Tensor:
        """Run component ``k`` on ``h`` -> logits ``(n, S_max)``."""
        return functional_call(self.template, self.state_of(k), (h,))

    def _forward_vmap(self, h: Tensor, index: Tensor | None) -> Tensor:
        params, buffers = self.stacked()
        if index is not None:  # a subset: gathered copies; updated batch-norm statistics are copied back
            params = {n: p.index_select(0, index) for n, p in params.items()}
            full, buffers = buffers, {n: b.index_select(0, index) for n, b in buffers.items()}

        def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.template, (p, b), (x,))

        out = vmap(one, in_dims=(0, 0, None), randomness="different")(params, buffers, h)
        if index is not None and self.training:
            with torch.no_grad():
                for n, b in buffers.items():
                    full[n].index_copy_(0, index, b)
        return out

    def forward_all(self, h: Tensor, index: Tensor | None = None) -> Tensor:
        """Components ``index`` (default: all K) on the whole batch -> logits ``(len(index), B, S_max)``.

        ``auto`` batches the components with ``vmap`` on a GPU (one launch instead of K) and loops on
        the CPU, where the loop measured faster (docs/BENCHMARKS.md, HD-CNN).
        """
        use_vmap = self._vmap_ok is not False and not (self.exec_mode == "auto" and h.device.type == "cpu")
        if use_vmap:
            try:
                return self._forward_vmap(h, index)
            except Exception as exc:  # vmap cannot trace some exotic layers: fall back, once
                if self._vmap_ok:
                    raise
                log.warning("HD-CNN: vmap over fine components failed (%s); running them in a loop", exc)
                self._vmap_ok = False
        ks = range(self.num_components) if index is None else index.tolist()
        return torch.stack([self.forward_one(k, h) for k in ks])

    def component(self, k: int) -> nn.Module:
        """A standalone, independent copy of component ``k`` (e.g. to pretrain it alone)."""
        params, buffers = self.state_of(k)
        device = next(iter(params.values())).device
        module = copy.deepcopy(self.template).to_empty(device=device)
        module.load_state_dict({**params, **buffers})
        module.train(self.training)
        return module

    # ---- product quantisation of the stacked weights ----

    def _matrix_dims(self, name: str) -> tuple[int, int]:
        shape = self.template.get_parameter(name).shape
        return int(shape[0]), int(torch.Size(shape[1:]).numel())

    def apply_pq_structure(self, name: str, s: int, k: int, axis: str = "rows") -> None:
        """Empty code / centre buffers (K of each) for the stacked weight ``name``, so that a compressed
        ``state_dict`` loads (:func:`~coarse2fine.compress.apply_compression_structure`)."""
        if name not in self._param_names or self.template.get_parameter(name).dim() < 2:
            weights = [n for n in self._param_names if self.template.get_parameter(n).dim() >= 2]
            raise ModelError(f"fine components: no weight named {name!r} to quantise; weights: {', '.join(weights)}")
        codes, centers = pq_buffers(*self._matrix_dims(name), s, k, axis)
        device = getattr(self, _mangle(name)).device
        K = self.num_components
        self.register_buffer(f"{_mangle(name)}__codes", torch.zeros(K, *codes, dtype=torch.uint8, device=device))
        self.register_buffer(f"{_mangle(name)}__centers", torch.zeros(K, *centers, device=device))
        self._pq[name] = (s, k, axis)

    @torch.no_grad()
    def set_quantized(self, name: str, s: int, k: int, axis: str, codes: Tensor, centers: Tensor) -> None:
        """Store the K components' codes ``(K, ...)`` and centres of weight ``name`` and put the
        dequantised values into the stacked weight."""
        self.apply_pq_structure(name, s, k, axis)
        getattr(self, f"{_mangle(name)}__codes").copy_(codes)
        getattr(self, f"{_mangle(name)}__centers").copy_(centers)
        getattr(self, _mangle(name)).copy_(self._fold(name, self._dequantised(name)))

    def _dequantised(self, name: str, codes: Tensor | None = None, centers: Tensor | None = None) -> Tensor:
        axis = self._pq[name][2]
        codes = getattr(self, f"{_mangle(name)}__codes") if codes is None else codes
        centers = getattr(self, f"{_mangle(name)}__centers") if centers is None else centers
        m, n = self._matrix_dims(name)
        dims = oriented(m, n, axis)[1]
        shape = self.template.get_parameter(name).shape
        return torch.stack([dequantise(codes[i], centers[i], dims, axis).reshape(shape) for i in range(len(codes))])

    def quantised(self) -> dict[str, tuple[int, int, str]]:
        """``{stacked weight name: (s, k, axis)}`` of the product-quantised weights."""
        return dict(self._pq)

    def _dequantise_on_load(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self._pq:
            key = prefix + _mangle(name)
            codes, centers = f"{key}__codes", f"{key}__centers"
            if key not in state_dict and codes in state_dict and centers in state_dict:
                value = self._dequantised(name, state_dict[codes], state_dict[centers].float())
                state_dict[key] = self._fold(name, value).to(getattr(self, _mangle(name)).dtype)

    def select_slots(self, state_dict: dict[str, Any], prefix: str, keep: Sequence[int], total: int) -> None:
        """In place: the tensors of ``state_dict`` under ``prefix`` that stack ``total`` components (an
        earlier layout) keep only the slots ``keep``, in that order. Folded 4-D weights
        ``(total * out, ...)`` and product-quantised codes / centres ``(total, ...)`` included; tensors
        already stacking ``len(keep)`` components are left as they are."""
        index = torch.as_tensor(list(keep), dtype=torch.long)
        names = {_mangle(n): n for n in [*self._param_names, *self._buffer_names]}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            value, local = state_dict[key], key[len(prefix) :]
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue
            name = names.get(local)
            if name in self._folded:
                if value.shape[0] == total * self._folded[name]:
                    rows = value.unflatten(0, (total, self._folded[name]))
                    state_dict[key] = rows.index_select(0, index.to(value.device)).flatten(0, 1)
            elif (name is not None or local.endswith(("__codes", "__centers"))) and value.shape[0] == total:
                state_dict[key] = value.index_select(0, index.to(value.device))

    @torch.no_grad()
    def load_component(self, k: int, module: nn.Module) -> None:
        """Copy the parameters and buffers of ``module`` (same structure) into slot ``k``."""
        state = module.state_dict()
        params, buffers = self.stacked()
        for name, target in {**params, **buffers}.items():
            if name not in state:
                raise ModelError(f"fine component {k}: missing tensor {name!r} in the module to load")
            target[k].copy_(state[name])


def _drop_quantised(module: FineComponents, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` hook: a quantised weight is saved as its codes and centres only."""
    for name in module._pq:
        state.pop(prefix + _mangle(name), None)


# ---- HD-CNN -------------------------------------------------------------------------------------


def _fine_component(rear: nn.Module, cls_name: str, members: Sequence[int], s_max: int, head_init: str) -> nn.Module:
    """A copy of the rear layers whose classifier ``cls_name`` has ``s_max`` outputs, the first |S_k| for
    ``members``: new (``random``) or the block's rows of those classes (``block``)."""
    comp = copy.deepcopy(rear)
    layer = comp.get_submodule(cls_name)
    head = _resized_classifier(layer, s_max)
    if head_init == "block":  # start from the block's rows of the classes in S_k
        with torch.no_grad():
            head.weight[: len(members)].copy_(layer.weight[members])
            if head.bias is not None:
                head.bias[: len(members)].copy_(layer.bias[members])
    _set_submodule(comp, cls_name, head)
    return comp


def _normalise_partial_sets(
    partial_sets: Sequence[Sequence[int | str]], class_names: Sequence[str] | None, num_classes: int
) -> list[list[int]]:
    index = {name: i for i, name in enumerate(class_names or [])}
    result: list[list[int]] = []
    for k, members in enumerate(partial_sets):
        ids: list[int] = []
        for m in members:
            if isinstance(m, str):
                if m not in index:
                    raise HierarchyError(f"partial set {k}: class {m!r} is not one of the model's classes")
                ids.append(index[m])
            else:
                j = int(m)
                if not 0 <= j < num_classes:
                    raise HierarchyError(f"partial set {k}: class index {j} outside 0..{num_classes - 1}")
                ids.append(j)
        if not ids:
            raise HierarchyError(f"partial set {k} is empty; every coarse category needs a fine class")
        if len(set(ids)) != len(ids):
            raise HierarchyError(f"partial set {k} lists a class twice: {ids}")
        result.append(sorted(ids))
    return result


class HDCNN(nn.Module):
    """Hierarchical deep CNN from a building block and partial sets (METHODS.md §2.2, 2.4).

    ``forward(x)`` returns a dict (ARCHITECTURE.md training contract):

    - ``"logits"``: log p(j|x), clamped at ``LOG_CLAMP`` (B, C);
    - ``"probs"``: p(j|x) (B, C), rows sum to 1;
    - ``"coarse_probs"``: B_ik after aggregation and L1 normalisation (B, K);
    - ``"fine_probs_coarse"``: the coarse component's fine softmax B^f (B, C);
    - ``"heads"``: ``{"coarse_component": log B^f}`` (the coarse component as a fine classifier);
    - ``"components_run"``: fine components executed per image (B,) int64 (a one-class partial set
      has no component: its p_k is 1 on its class).

    ``self.fine`` stacks the components of ``runnable`` (the partial sets of more than one class): slot
    ``i`` is partial set ``runnable[i]`` (:meth:`slot`).
    """

    def __init__(
        self,
        block: nn.Module,
        partial_sets: Sequence[Sequence[int | str]],
        branch_stage: str,
        *,
        class_names: Sequence[str] | None = None,
        beta: float | None = None,
        fine_exec: str = "auto",
        fine_head_init: str = "random",
    ) -> None:
        super().__init__()
        if not hasattr(block, "split") or not hasattr(block, "num_classes"):
            raise ModelError(f"HD-CNN needs a Backbone with split(stage); got {type(block).__name__}")
        num_classes = int(block.num_classes)
        if class_names is not None and len(class_names) != num_classes:
            raise HierarchyError(
                f"hierarchy has {len(class_names)} classes but the building block outputs {num_classes}"
            )
        sets = _normalise_partial_sets(partial_sets, class_names, num_classes)
        num_coarse = len(sets)
        if num_coarse < 1:
            raise HierarchyError("the hierarchy has no partial sets")
        if num_coarse > num_classes:
            raise HierarchyError(f"K={num_coarse} coarse categories exceeds the {num_classes} fine classes")
        uncovered = sorted(set(range(num_classes)) - {j for s in sets for j in s})
        if uncovered:
            names = [class_names[j] for j in uncovered] if class_names else uncovered
            raise HierarchyError(f"classes {names} are in no partial set, so HD-CNN could never predict them")
        singletons = [k for k, s in enumerate(sets) if len(s) == 1]
        if len(singletons) == num_coarse:
            raise HierarchyError(
                f"every one of the {num_coarse} partial sets holds one class, so HD-CNN would have no fine "
                "component and be its coarse component alone; choose a smaller hdcnn.num_coarse"
            )
        if fine_head_init not in ("random", "block"):
            raise ModelError(f"hdcnn fine_head_init {fine_head_init!r} is not 'random' or 'block'")

        preceding, rear = split_block(block, branch_stage)  # ModelError listing the stages if unknown
        self.branch_stage = branch_stage
        self.num_classes = num_classes
        self.num_coarse = num_coarse
        self.partial_sets = sets
        self.class_names = list(class_names) if class_names is not None else None
        self.beta = beta
        self.shared = copy.deepcopy(preceding)
        self.coarse = copy.deepcopy(rear)

        cls_name, cls_layer = find_classifier(rear)
        if getattr(cls_layer, "out_features", getattr(cls_layer, "out_channels", None)) != num_classes:
            raise ModelError(f"the rear's last classifier layer {cls_name!r} does not output the {num_classes} classes")
        self.classifier_name = cls_name
        s_max = max(len(s) for s in sets)
        # a partial set of one class needs no network: p_k = 1 on that class (it has no F_k, no slot)
        self.singletons = singletons
        self.runnable = [k for k, s in enumerate(sets) if len(s) > 1]
        self._slots = {k: i for i, k in enumerate(self.runnable)}
        components = [_fine_component(rear, cls_name, sets[k], s_max, fine_head_init) for k in self.runnable]
        self.fine = FineComponents(components, fine_exec)

        membership = torch.zeros(num_classes, num_coarse)
        expand = torch.zeros(num_coarse, s_max, num_classes)
        valid = torch.zeros(num_coarse, s_max, dtype=torch.bool)
        for k, members in enumerate(sets):
            membership[members, k] = 1.0
            expand[k, torch.arange(len(members)), torch.tensor(members)] = 1.0
            valid[k, : len(members)] = True
        self.register_buffer("membership", membership, persistent=False)  # (C, K)
        self.register_buffer("expand", expand, persistent=False)  # (K, S_max, C) local -> global
        self.register_buffer("valid", valid, persistent=False)  # (K, S_max)
        long = torch.long
        self.register_buffer("run_index", torch.tensor(self.runnable, dtype=long), persistent=False)
        self.register_buffer("single_index", torch.tensor(self.singletons, dtype=long), persistent=False)
        single_class = torch.tensor([sets[k][0] for k in self.singletons], dtype=long)
        self.register_buffer("single_class", single_class, persistent=False)
        self._register_load_state_dict_pre_hook(self._drop_one_class_slots)

    # ---- the stack's slots --------------------------------------------------------------------------
    def slot(self, k: int) -> int:
        """Where partial set ``k``'s fine component is in ``self.fine``; a one-class set has none (ModelError)."""
        if k in self._slots:
            return self._slots[k]
        if 0 <= k < self.num_coarse:
            raise ModelError(
                f"partial set {k} holds one class ({self.partial_sets[k][0]}): it has no fine component "
                "(p_k is 1 on its class), so there is nothing to train, load or run"
            )
        raise ModelError(f"partial set {k} does not exist; this HD-CNN has K={self.num_coarse}")

    def convert_state_dict(self, state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """``state`` in this layout. The earlier one stacked a fine component for every partial set,
        one-class sets included; their slots (plain, folded or product-quantised tensors) are dropped."""
        state = dict(state)
        if self.singletons:
            self.fine.select_slots(state, prefix + "fine.", self.runnable, self.num_coarse)
        return state

    def _drop_one_class_slots(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.singletons:  # load_state_dict pre-hook: runs before FineComponents' own (dequantisation)
            self.fine.select_slots(state_dict, prefix + "fine.", self.runnable, self.num_coarse)

    # ---- pieces ---------------------------------------------------------------------------------
    def coarse_forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(B^f (B, C), B (B, K)) from shared features ``h`` (METHODS.md §2.2 aggregation, in fp32)."""
        logits = self.coarse(h)
        with _no_autocast(logits):
            fine_probs = F.softmax(logits.float(), dim=-1)
            agg = fine_probs @ self.membership.float()
            return fine_probs, agg / agg.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    def local_probs(self, k: int | Tensor, logits: Tensor) -> Tensor:
        """fp32 softmax over the valid outputs of partial set ``k`` (or of sets ``k``, for ``(n, B, S)``)."""
        mask = self.valid[k]
        if isinstance(k, Tensor):
            mask = mask[:, None, :]
        with _no_autocast(logits):
            return F.softmax(logits.float().masked_fill(~mask, float("-inf")), dim=-1)

    def _singleton_part(self, weights: Tensor) -> Tensor:
        """sum over one-class partial sets of B_ik p_k, with p_k = 1 on the set's class (no F_k run)."""
        out = weights.new_zeros(weights.shape[0], self.num_classes, dtype=torch.float32)
        return out.index_add_(1, self.single_class, weights.index_select(1, self.single_index).float())

    def conditional_weights(self, coarse_probs: Tensor, beta: float) -> Tensor:
        """B_ik set to 0 below 1/(beta K) (compared in fp32); each image keeps at least its most probable component."""
        with _no_autocast(coarse_probs):
            coarse_probs = coarse_probs.float()
            keep = coarse_probs >= 1.0 / (beta * self.num_coarse)
            top = coarse_probs.argmax(dim=1, keepdim=True)
            keep = keep.scatter(1, top, True)
            return coarse_probs * keep

    def _all_components(self, h: Tensor, weights: Tensor) -> Tensor:
        """Every stored component on the whole batch (layers under autocast), averaged (13) in fp32."""
        idx = self.run_index
        logits = self.fine.forward_all(h)  # (R, B, S_max): slot i is partial set runnable[i]
        with _no_autocast(weights):
            weights = weights.float()
            local = self.local_probs(idx, logits)
            mixed = torch.einsum("bk,kbs,ksc->bc", weights.index_select(1, idx), local, self.expand[idx].float())
            return (mixed + self._singleton_part(weights)) / weights.sum(dim=1, keepdim=True)

    def _routed_components(self, h: Tensor, weights: Tensor) -> Tensor:
        """Run F_k only on the images with a nonzero weight for k (METHODS.md §2.4); averaging in fp32."""
        weights = weights.float()
        out = self._singleton_part(weights)
        for slot, k in enumerate(self.runnable):
            idx = torch.nonzero(weights[:, k] > 0, as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            logits = self.fine.forward_one(slot, h.index_select(0, idx))
            with _no_autocast(logits):
                local = self.local_probs(k, logits)
                contrib = (local @ self.expand[k].float()) * weights.index_select(0, idx)[:, k : k + 1]
                out.index_add_(0, idx, contrib)
        with _no_autocast(out):
            return out / weights.sum(dim=1, keepdim=True)

    def forward(self, x: Tensor, beta: float | str | None = "default") -> dict[str, Any]:
        """``beta``: ``"default"`` uses ``self.beta``; None runs every component; a number routes."""
        beta = self.beta if isinstance(beta, str) else beta
        h = self.shared(x)
        fine_probs, coarse_probs = self.coarse_forward(h)
        if self.training or beta is None:
            weights = coarse_probs
            probs = self._all_components(h, weights)
            run = torch.full((x.shape[0],), self.run_index.numel(), dtype=torch.long, device=x.device)
        else:
            weights = self.conditional_weights(coarse_probs, beta)
            probs = self._routed_components(h, weights)
            run = (weights.index_select(1, self.run_index) > 0).sum(dim=1)
        return {
            "logits": probs.clamp_min(LOG_CLAMP).log(),
            "probs": probs,
            "coarse_probs": coarse_probs,
            "fine_probs_coarse": fine_probs,
            "heads": {"coarse_component": fine_probs.clamp_min(LOG_CLAMP).log()},
            "components_run": run,
        }

    # ---- fine components one at a time (pretraining, METHODS.md §2.3 step 2) -----------------------------
    def fine_component_net(self, k: int) -> nn.Module:
        """A copy of the shared layers (frozen, eval mode) + an independent copy of F_k: |S_k| logits.

        ``k`` is the partial set; a one-class set has no F_k (ModelError)."""
        slot = self.slot(k)
        return FineComponentNet(copy.deepcopy(self.shared), self.fine.component(slot), len(self.partial_sets[k]))

    def load_fine_component(self, k: int, net: nn.Module) -> None:
        """Copy a (pre)trained :meth:`fine_component_net` of partial set k back into its slot."""
        self.fine.load_component(self.slot(k), net.component if isinstance(net, FineComponentNet) else net)

    def metadata(self) -> dict[str, Any]:
        return {"partial_sets": self.partial_sets, "branch_stage": self.branch_stage}

    def extra_repr(self) -> str:
        sizes = [len(s) for s in self.partial_sets]
        return (
            f"branch_stage={self.branch_stage!r}, K={self.num_coarse}, |S_k|={sizes}, "
            f"fine components={len(self.runnable)}, beta={self.beta}"
        )


class UnrolledHDCNN(nn.Module):
    """An HD-CNN with every fine component run and probabilistic averaging (``beta=None``), built from
    plain modules: each runnable F_k a standalone copy, no ``torch.func`` call. For tracers that cannot
    follow ``functional_call`` (the ONNX exporter); conditional execution needs :class:`HDCNN` itself.

    ``forward(x) -> (probs (B, C), coarse_probs (B, K))``, equal to ``HDCNN.forward(x, beta=None)``'s
    ``"probs"`` and ``"coarse_probs"``.
    """

    def __init__(self, model: HDCNN) -> None:
        super().__init__()
        self.shared = copy.deepcopy(model.shared)
        self.coarse = copy.deepcopy(model.coarse)
        self.components = nn.ModuleList(model.fine.component(k) for k in model.runnable)
        self.runnable = list(model.runnable)
        self.sizes = [len(model.partial_sets[k]) for k in model.runnable]
        single = torch.zeros(model.num_coarse, model.num_classes)
        for k in model.singletons:
            single[k, model.partial_sets[k][0]] = 1.0  # p_k = 1 on the set's one class
        self.register_buffer("membership", model.membership.detach().clone())  # (C, K)
        self.register_buffer("single", single.to(model.membership.device))  # (K, C)
        self.register_buffer("expand", model.expand[model.run_index].detach().clone())  # (runnable, S_max, C)
        self.eval()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.shared(x)
        agg = F.softmax(self.coarse(h).float(), dim=-1) @ self.membership
        coarse_probs = agg / agg.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        mixed = coarse_probs @ self.single
        for i, (component, k, n) in enumerate(zip(self.components, self.runnable, self.sizes)):
            local = F.softmax(component(h)[:, :n].float(), dim=-1)
            mixed = mixed + coarse_probs[:, k : k + 1] * (local @ self.expand[i, :n])
        return mixed / coarse_probs.sum(dim=-1, keepdim=True), coarse_probs


class FineComponentNet(nn.Module):
    """Shared layers (frozen: no gradient, always eval mode) followed by one fine component.

    Outputs logits over the |S_k| local classes (the padding outputs are cut off).
    """

    def __init__(self, shared: nn.Module, component: nn.Module, num_local: int) -> None:
        super().__init__()
        self.shared = shared
        self.component = component
        self.num_local = num_local
        for p in self.shared.parameters():
            p.requires_grad_(False)
        self.shared.eval()

    def train(self, mode: bool = True) -> FineComponentNet:
        super().train(mode)
        self.shared.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.component.parameters()

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            h = self.shared(x)
        return self.component(h)[:, : self.num_local]
