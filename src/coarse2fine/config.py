"""Typed run configuration: YAML recipes in ``configs/`` plus ``--set key=value`` overrides.

Every section is a dataclass; unknown keys and wrong value types are errors that name the key,
the file and the valid keys. ``to_dict`` gives the resolved config saved with every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from coarse2fine.errors import ConfigError

T = TypeVar("T")


@dataclass
class DataConfig:
    """Which data, how it is split, augmented and batched."""

    name: str = "fashion_mnist"  # fashion_mnist | cifar100 | cub | nabirds | folder
    root: str | None = None  # None: the dataset's default location
    val_fraction: float = 0.1  # stratified held-out part of the training set
    label: str = "fine"  # cifar100: fine | coarse
    image_size: int | None = None  # crop fed to the network; None: dataset default (28, 32, 224)
    train_scale: list[int] | None = None  # [S] fixed or [S_min, S_max] jittered (large images)
    test_scale: int | None = None  # Q for the centre crop; None: S (or (S_min+S_max)/2)
    pad: int = 4  # small images: zero padding before the random crop
    flip: bool = True  # random horizontal flip
    color_shift: float = 0.0  # small images: 0; large: PCA RGB colour shift strength (VGG uses 0.1)
    batch_size: int = 128
    eval_batch_size: int | None = None  # None: 2 x batch_size
    workers: int = 2
    bad_images: str = "error"  # error | skip
    limit_train: int | None = None  # use only this many training images (quick runs)
    limit_test: int | None = None


@dataclass
class ModelConfig:
    """The building block (or the backbone a method wraps)."""

    name: str = "vgg_small_bn"
    kwargs: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # paper | kaiming | glorot ; None: the model's default
    pretrained_file: str | None = None  # local weights (safetensors or torch state dict)
    init_from: str | None = None  # VGG: initialise from a trained shallower VGG checkpoint


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # plateau | cosine | onecycle | constant
    warmup_epochs: float = 0.0  # linear warm-up (cosine); may be fractional
    warmup_steps: int | None = None  # overrides warmup_epochs when given
    min_lr: float = 0.0
    plateau_patience: int = 2  # plateau: epochs without val improvement before lr /= 10
    plateau_factor: float = 0.1
    max_reductions: int = 3  # plateau: the paper divided the lr 3 times


@dataclass
class TrainConfig:
    epochs: int = 10
    label_smoothing: float = 0.0
    accumulate: int = 1  # gradient accumulation steps
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp16 | off
    channels_last: bool = True
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    grad_clip: float | None = None
    nan_policy: str = "stop"  # stop | skip
    log_every: int = 50  # steps between TensorBoard scalars
    compile: bool = False
    threads: int | None = None  # torch.set_num_threads; None: leave as is
    keep_checkpoints: int = 3  # per-epoch checkpoints/epoch_XXX.pt kept besides last.pt and best.pt
    find_unused_parameters: bool = False  # DDP: for models whose forward skips some parameters


@dataclass
class EvalConfig:
    protocol: str = "center"  # center | dense | multicrop | multiscale | dense+multicrop
    scales: list[int] | None = None
    flip: bool = True
    batch_size: int | None = None


@dataclass
class HDCNNConfig:
    """HD-CNN (METHODS.md §2). Used by ``c2f hdcnn fit``."""

    branch_stage: str = "stage2"  # shared layers end here
    num_coarse: int = 4  # K
    clustering: str = "spectral"  # spectral | affinity (authors' kNN + eigenmap + AP)
    gamma: float = 5.0  # u_t = 1 / (gamma K)
    max_partial_size: int | None = None  # cap |S_k| (released code: 80 of 100)
    consistency_weight: float = 20.0  # lambda (paper 20, released code 5)
    coarse_targets: str = "paper"  # t_k: paper (METHODS.md §2.3) | aggregation (mean B_ik of an exact coarse component)
    beta: float | None = None  # conditional execution threshold 1/(beta K); None: run all
    block_checkpoint: str | None = None  # reuse a trained building block
    block_epochs: int | None = None  # None: train.epochs
    fine_epochs: int = 3  # fine-component pre-training
    finetune_epochs: int = 3  # global fine-tuning
    finetune_lr: float | None = None  # None: optim.lr / 10
    reference_hierarchy: str | None = None  # JSON {coarse: [fine, ...]} to compare against
    fine_lr: float | None = None  # fine-component pre-training lr; None: optim.lr
    fine_head_init: str = "random"  # random (METHODS.md §2.3: all but the last layer copied) | block (its rows)
    fine_exec: str = "auto"  # auto (vmap on GPU, loop on CPU) | vmap (K components batched) | loop
    beta_sweep: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])  # evaluation sweep


@dataclass
class HERBSConfig:
    """HERBS (METHODS.md §3). Enabled when ``method: herbs``; see ``coarse2fine.herbs``."""

    stages: list[str] | None = None  # stages to use; None: the last len(num_selects) (default 4, or all)
    fpn_size: int = 256  # common width F
    num_selects: list[float] | None = None  # K_i as counts (>=1) or fractions (<1); None: official fractions
    rank_by: str = "official"  # official (mean-prediction class) | paper (max softmax per token)
    use_fpn: bool = True  # top-down path (off: projections only)
    use_bottom_up: bool = True  # bottom-up path (required by use_refinement)
    use_selection: bool = True  # selector + dropped loss
    use_combiner: bool = True  # graph combiner + merged loss
    use_refinement: bool = True  # top-down classifiers k1 + refinement loss
    basic: str | None = None  # None | bs | refine : the basic variants on the last block(s); ignore use_*
    num_graph_nodes: int | None = None  # combiner pooled nodes; None: max(4, kept tokens // 64)
    combiner_pool: str = "linear"  # linear (official, fixed token count) | attention (any size)
    lambda_merged: float = 1.0
    lambda_layer: float = 0.3
    lambda_dropped: float = 5.0
    lambda_refine: float = 1.0  # paper 1, official code 1.375
    temperature: float = 64.0  # T_0
    temperature_period: int = 10  # T_e = T_0 0.5^floor(e / period)
    # refinement KL per token over classes: sum (paper's formula) | mean (official nn.KLDivLoss(): also / C_gt)
    refine_reduction: typing.Literal["mean", "sum"] = "sum"
    # official per-stage Linear-ReLU-Linear (F -> F) on each top-down output before the bottom-up addition
    bottom_up_proj: bool = True
    # Swin stage outputs: timm (as timm gives them) | merged (official: stages 1..L-1 after the next patch merging)
    swin_stages: typing.Literal["timm", "merged"] = "timm"


@dataclass
class RunConfig:
    """A whole run: ``c2f train --config configs/<recipe>.yaml``."""

    name: str = "run"
    method: str = "plain"  # plain | herbs | hdcnn
    out_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hdcnn: HDCNNConfig = field(default_factory=HDCNNConfig)
    herbs: HERBSConfig = field(default_factory=HERBSConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# ---- generic typed loading ----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert int->float and dict->dataclass."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a single S is a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            return "on" if value else "off"
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error listing the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (values parsed as YAML)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from exc
        raise


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a resolved config (e.g. the one stored in a checkpoint)."""
    return from_dict(RunConfig, data)
