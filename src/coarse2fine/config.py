"""Typed run configuration: YAML recipes in ``configs/`` plus ``--set key=value`` overrides.

Every section is a dataclass. Settings are validated once, when a recipe (or a stored config) is
loaded: unknown keys, wrong value types, values outside a ``Literal[...]``, numbers outside the range
declared next to the field (``setting(..., ge=1)``) and impossible combinations (``_problems``) are
errors that name the key as ``--set`` spells it (``optim.lr``) and say what is allowed. Code that
receives a loaded config does not check it again. ``to_dict`` gives the resolved config saved with
every run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from coarse2fine.errors import ConfigError

T = TypeVar("T")

# ---- allowed values ------------------------------------------------------------------------------
# The recipe vocabulary. Lower layers that also take plain arguments from Python (the dataset
# registry, the HERBS selector, ...) keep their own tuples; tests/test_config.py checks they agree.

Method = Literal["plain", "herbs", "hdcnn"]
DatasetName = Literal["fashion_mnist", "cifar100", "cifar10", "cub", "nabirds", "folder"]
LabelLevel = Literal["fine", "coarse"]
BadImages = Literal["error", "skip"]
CacheMode = Literal["auto", "on", "off"]
Init = Literal["paper", "kaiming", "glorot"]
OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["plateau", "cosine", "onecycle", "constant"]
Amp = Literal["auto", "bf16", "fp16", "off"]
NanPolicy = Literal["stop", "skip"]
TestProtocol = Literal["center", "dense", "multicrop", "multiscale", "dense+multicrop"]
Clustering = Literal["auto", "spectral", "affinity", "agglomerative"]
RefineReduction = Literal["mean", "sum"]
SwinStages = Literal["timm", "merged"]
CoarseTargets = Literal["paper", "aggregation"]
FineHeadInit = Literal["random", "block"]
FineExec = Literal["auto", "vmap", "loop"]
RankBy = Literal["official", "paper"]
BasicVariant = Literal["bs", "refine"]
CombinerPool = Literal["linear", "attention"]
AutoAugment = Literal["rand", "trivial"]
BestOn = Literal["model", "ema"]
LoggerName = Literal["csv", "tensorboard", "mlflow", "wandb"]
WandbMode = Literal["offline", "online", "disabled"]

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
# out_dir/<name> stays one folder inside out_dir (a run started over with --overwrite empties it)
RUN_NAME = (r"(?!\.\.?$)[^/\\\x00]{1,255}", "one folder name (no '/', not '.' or '..', 1-255 characters)")


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric setting (of every item of a list setting); ``None`` values pass."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, x: float) -> bool:
        return (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )

    def __str__(self) -> str:
        ops = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        bounds = [(op, v) for op, v in ops if v is not None]
        if len(bounds) == 2:  # a lower and an upper bound: an interval such as [0, 1)
            (op_lo, lo), (op_hi, hi) = bounds
            return f"in {'[' if op_lo == '>=' else '('}{_num(lo)}, {_num(hi)}{']' if op_hi == '<=' else ')'}"
        return " and ".join(f"{op} {_num(v)}" for op, v in bounds)


def _num(x: Any) -> str:
    return format(x, "g") if isinstance(x, float) else quote(x)


class _ShortRepr(reprlib.Repr):
    """``reprlib`` with short limits; an integer too long to print is described by its length."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 120
        self.maxlong, self.maxlevel, self.maxdict = 60, 3, 6
        self.maxlist = self.maxtuple = self.maxset = 8

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:  # str() of an int over 4300 digits raises; nobody reads 78 digits
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()
QUOTE_LIMIT = 200


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` (e.g. a path) for an error message, at most ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters: long strings, lists, mappings
    and numbers are shortened (never built in full), so a hostile value cannot flood a message."""
    return clip(_SHORT.repr(value), limit)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    pattern: tuple[str, str] | None = None,
) -> Any:
    """A dataclass field with its allowed range (``ge``/``gt``/``le``/``lt``) or ``pattern`` (regex, hint)."""
    meta: dict[str, Any] = {}
    if any(b is not None for b in (ge, gt, le, lt)):
        meta["range"] = Range(ge=ge, gt=gt, le=le, lt=lt)
    if pattern is not None:
        meta["pattern"] = pattern
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---- sections ------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which data, how it is split, augmented and batched (METHODS.md §1 "Training recipe and scales", §4)."""

    name: DatasetName = "fashion_mnist"
    root: str | None = None  # None: the dataset's default location (folder: required, --set data.root=...)
    val_fraction: float = setting(0.1, gt=0, lt=1)  # stratified held-out part of the training set
    label: LabelLevel = "fine"  # coarse: cifar100 only
    image_size: int | None = setting(None, ge=1)  # crop fed to the network; None: from the data or the model
    train_scale: list[int] | None = setting(None, ge=1)  # [S] fixed or [S_min, S_max] jittered (large images)
    test_scale: int | None = setting(None, ge=1)  # Q for the centre crop; None: S (or (S_min+S_max)/2)
    pad: int = setting(4, ge=0)  # small images: zero padding before the random crop
    flip: bool = True  # random horizontal flip
    color_shift: float = setting(0.0, ge=0)  # small images: 0; large: PCA RGB colour shift strength (VGG 0.1)
    batch_size: int = setting(128, ge=1)  # the global batch, split across processes
    eval_batch_size: int | None = setting(None, ge=1)  # None: 2 x batch_size
    workers: int = setting(2, ge=0)
    bad_images: BadImages = "error"  # file datasets: an unreadable image stops the run, or is skipped
    limit_train: int | None = setting(None, ge=1)  # use only this many training images (quick runs)
    limit_test: int | None = setting(None, ge=1)
    # folder datasets (METHODS.md §4 "Class-per-folder trees")
    test_fraction: float | None = setting(None, gt=0, lt=1)  # a tree without test/: stratified test part (seed)
    split_file: str | None = None  # CSV path,label,split (train|test), paths relative to root; beats test_fraction
    follow_external_links: bool = False  # follow symbolic links that lead out of data.root
    cache: CacheMode = "auto"  # decode small images once into a uint8 array; auto: one size <= 64 px
    # mean/std the images are normalised with: auto = the pretrained weights' own (model.pretrained) or else the
    # training split's; dataset = always the training split's; pretrained = the weights' (needs model.pretrained)
    normalize: Literal["auto", "dataset", "pretrained"] = "auto"
    cache_dir: str | None = None  # None: $C2F_CACHE_DIR or ~/.cache/coarse2fine/folders

    # augmentation (timm/torchvision)
    auto_augment: AutoAugment | None = None  # torchvision v2 RandAugment | TrivialAugmentWide; None: off
    auto_augment_magnitude: int = setting(9, ge=0, le=30)  # RandAugment magnitude (bin of 31)
    random_erase: float = setting(0.0, ge=0, le=1)  # timm RandomErasing probability per image (normalised batch)
    mixup_alpha: float = setting(0.0, ge=0)  # timm Mixup: Beta(alpha, alpha) mixing; 0: off
    cutmix_alpha: float = setting(0.0, ge=0)  # timm CutMix: Beta(alpha, alpha) box area; 0: off
    mix_prob: float = setting(1.0, ge=0, le=1)  # probability that a batch is mixed (mixup or cutmix)
    mix_switch_prob: float = setting(0.5, ge=0, le=1)  # both on: probability of cutmix instead of mixup

    # file datasets of large images: where JPEGs are decoded and augmented; cuda: workers read bytes, batches are
    # decoded (nvJPEG) and transformed on the training GPU (data.device_decode; docs/BENCHMARKS.md)
    decode_device: Literal["cpu", "cuda"] = "cpu"

    @property
    def mixing(self) -> bool:
        """Mixup or CutMix is on (the targets become soft)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.train_scale is not None:
            scale = self.train_scale
            if len(scale) not in (1, 2) or (len(scale) == 2 and scale[0] > scale[1]):
                yield "train_scale", f"give [S] or [S_min, S_max] with S_min <= S_max, got {quote(scale)}"
            elif self.image_size is not None and min(scale) < self.image_size:
                yield "train_scale", f"S={min(scale)} is smaller than the crop data.image_size={self.image_size}"
        if self.test_scale is not None and self.image_size is not None and self.test_scale < self.image_size:
            yield "test_scale", f"Q={self.test_scale} is smaller than the crop data.image_size={self.image_size}"
        if self.label == "coarse" and self.name != "cifar100":
            yield "label", f"'coarse' exists for data.name=cifar100 only, not {self.name!r}; --set data.label=fine"
        for key in ("test_fraction", "split_file"):
            if getattr(self, key) is not None and self.name != "folder":
                yield key, f"applies to data.name=folder only, not {self.name!r}; remove it"
        if self.cache == "on" and self.name != "folder":
            yield "cache", f"'on' applies to data.name=folder only ({self.name!r} is read as it is); use auto or off"


@dataclass
class ModelConfig:
    """The building block (or the backbone a method wraps)."""

    name: str = "vgg_small_bn"  # a registered model or timm/<name>
    kwargs: dict[str, Any] = field(default_factory=dict)
    init: Init | None = None  # METHODS.md §1 "Initialisation"; None: the model's default
    # true: the timm model's default pretrained weights (Hugging Face hub, its cache); a string picks others:
    # a timm tag ("resnet18.a1_in1k" or "a1_in1k") or a hub id ("hf-hub:timm/resnet18.a1_in1k")
    pretrained: bool | str = False
    pretrained_file: str | None = None  # local weights (safetensors or torch state dict)
    init_from: str | None = None  # VGG: initialise from a trained shallower VGG checkpoint

    def _problems(self) -> Iterator[tuple[str, str]]:
        if isinstance(self.pretrained, str) and not self.pretrained.strip():
            yield "pretrained", "give true, false, a timm tag (resnet18.a1_in1k) or a hub id (hf-hub:timm/<name>)"
        if self.pretrained is not False and self.pretrained_file:
            yield "pretrained", "give model.pretrained or model.pretrained_file, not both"
        if self.pretrained is not False and self.init_from:
            yield "pretrained", "give model.pretrained or model.init_from, not both"


@dataclass
class OptimConfig:
    name: OptimizerName = "sgd"
    lr: float = setting(0.01, ge=0)  # 0 is allowed: the loop runs, weights stay (BN statistics still update)
    momentum: float = setting(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = False  # sgd with momentum > 0 only
    weight_decay: float = setting(5e-4, ge=0)  # weights only; norm and bias parameters get none


@dataclass
class ScheduleConfig:
    """Learning-rate schedule; ``plateau`` is the VGG recipe (METHODS.md §1 "Training recipe and scales")."""

    name: ScheduleName = "cosine"
    warmup_epochs: float = setting(0.0, ge=0)  # linear warm-up (cosine, constant, onecycle); may be fractional
    warmup_steps: int | None = setting(None, ge=0)  # overrides warmup_epochs when given
    min_lr: float = setting(0.0, ge=0)
    plateau_patience: int = setting(2, ge=0)  # plateau: epochs without val improvement before lr x factor
    plateau_factor: float = setting(0.1, gt=0, lt=1)
    max_reductions: int = setting(3, ge=0)  # plateau: the paper divided the lr 3 times


@dataclass
class TrainConfig:
    epochs: int = setting(10, ge=1)
    label_smoothing: float = setting(0.0, ge=0, lt=1)
    accumulate: int = setting(1, ge=1)  # gradient accumulation steps
    amp: Amp = "auto"  # auto: bf16 on CUDA, off on CPU
    channels_last: bool = True
    deterministic: bool = False
    device: str = setting("auto", pattern=(DEVICE_PATTERN, "auto, cpu, cuda or cuda:N"))
    grad_clip: float | None = setting(None, gt=0)  # max gradient norm; None: no clipping
    nan_policy: NanPolicy = "stop"  # a non-finite loss stops the run, or its step is skipped
    log_every: int = setting(50, ge=0)  # steps between step scalars (loss, lr) of the loggers; 0: none
    compile: bool = False
    threads: int | None = setting(None, ge=1, le=1024)  # torch.set_num_threads; None: leave as is
    keep_checkpoints: int = setting(3, ge=0)  # per-epoch checkpoints/epoch_XXX.pt kept besides last.pt, best.pt
    find_unused_parameters: bool = False  # DDP: for models whose forward skips some parameters
    ema_decay: float | None = setting(None, gt=0, lt=1)  # EMA of the weights (timm ModelEmaV3); None: off
    ema_warmup: bool = False  # EMA decay ramps up over the first steps (timm's warm-up)
    best_on: BestOn = "model"  # which weights best.pt holds (chosen on their validation top-1): model | ema
    # loggers (engine.callbacks): csv, tensorboard, mlflow (pip install mlflow-skinny), wandb (pip install wandb)
    loggers: list[LoggerName] = setting(factory=lambda: ["csv", "tensorboard"])
    mlflow_uri: str | None = None  # MLflow tracking URI; None: a file store in the run folder (<run>/mlruns)
    experiment: str | None = None  # MLflow experiment / W&B project; None: the run's name
    wandb_mode: WandbMode = "offline"  # offline: files under <run>/wandb, sync later with `wandb sync`

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.best_on == "ema" and self.ema_decay is None:
            yield "best_on", "'ema' needs train.ema_decay (e.g. 0.9998); set it, or best_on model"
        twice = sorted({name for name in self.loggers if self.loggers.count(name) > 1})
        if twice:
            yield "loggers", f"{', '.join(twice)} named more than once; name each logger once"


@dataclass
class EvalConfig:
    """``c2f eval`` defaults (METHODS.md §1 "Test protocols")."""

    protocol: TestProtocol = "center"
    scales: list[int] | None = setting(None, ge=1)  # test scales Q; None: from the training scale
    flip: bool = True  # average with the horizontally flipped images

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.scales is not None and not self.scales:
            yield "scales", "give at least one test scale Q, or null for the default"


@dataclass
class HDCNNConfig:
    """HD-CNN (METHODS.md §2). Used by ``c2f hdcnn fit``."""

    branch_stage: str = "stage2"  # shared layers end here (a stage of the building block)
    num_coarse: int = setting(4, ge=1)  # K
    # METHODS.md §2.1: auto (the best of the candidates on eqs. (11a)-(11b)) | spectral (paper) |
    # affinity (authors' kNN + eigenmap + AP) | agglomerative (average linkage on D)
    clustering: Clustering = "auto"
    gamma: float = setting(5.0, gt=0)  # u_t = 1 / (gamma K) (METHODS.md §2.1 step 4)
    max_partial_size: int | None = setting(None, ge=1)  # cap |S_k| (released code: 80 of 100)
    consistency_weight: float = setting(20.0, ge=0)  # lambda (paper 20, released code 5)
    coarse_targets: CoarseTargets = "paper"  # t_k, METHODS.md §2.3: paper (15) | aggregation (16)
    beta: float | None = setting(None, gt=0)  # conditional execution 1/(beta K) (METHODS.md §2.4); None: run all
    block_checkpoint: str | None = None  # reuse a trained building block
    block_epochs: int | None = setting(None, ge=1)  # None: train.epochs
    fine_epochs: int = setting(3, ge=0)  # fine-component pre-training (METHODS.md §2.3)
    finetune_epochs: int = setting(3, ge=0)  # global fine-tuning
    finetune_lr: float | None = setting(None, ge=0)  # None: optim.lr / 10
    reference_hierarchy: str | None = None  # JSON {coarse: [fine, ...]} to compare against
    fine_lr: float | None = setting(None, ge=0)  # fine-component pre-training lr; None: optim.lr
    fine_head_init: FineHeadInit = "random"  # METHODS.md §2.3: random (last layer new) | block (its rows)
    fine_exec: FineExec = "auto"  # METHODS.md §2.2: auto (vmap on GPU, loop on CPU) | vmap | loop
    beta_sweep: list[float] = setting(factory=lambda: [1.0, 2.0, 4.0, 8.0], gt=0)  # evaluation sweep
    # a block_checkpoint trained on another split (data name/root/val_fraction/limit_train, seed) is an
    # error (its training images may be in this run's held-out split); true: a warning
    allow_other_split: bool = False


@dataclass
class HERBSConfig:
    """HERBS (METHODS.md §3). Enabled when ``method: herbs``; see ``coarse2fine.herbs``."""

    stages: list[str] | None = None  # stages to use; None: the last len(num_selects) (default 4, or all)
    fpn_size: int = setting(256, ge=1)  # common width F
    num_selects: list[float] | None = setting(None, gt=0)  # K_i: counts (integers >= 1) or fractions (< 1)
    rank_by: RankBy = "official"  # METHODS.md §3: official (mean-prediction class) | paper (max softmax)
    use_fpn: bool = True  # top-down path (off: projections only)
    use_bottom_up: bool = True  # bottom-up path (required by use_refinement)
    use_selection: bool = True  # selector + dropped loss
    use_combiner: bool = True  # graph combiner + merged loss
    use_refinement: bool = True  # top-down classifiers k1 + refinement loss
    basic: BasicVariant | None = None  # METHODS.md §3 "Basic variants" on the last block(s); ignores use_*
    num_graph_nodes: int | None = setting(None, ge=1)  # combiner pooled nodes; None: max(4, kept tokens // 64)
    combiner_pool: CombinerPool = "linear"  # METHODS.md §3: linear (official, fixed size) | attention
    lambda_merged: float = setting(1.0, ge=0)
    lambda_layer: float = setting(0.3, ge=0)
    lambda_dropped: float = setting(5.0, ge=0)
    lambda_refine: float = setting(1.0, ge=0)  # paper 1, official code 1.375
    temperature: float = setting(64.0, gt=0)  # T_0
    temperature_period: int = setting(10, ge=1)  # T_e = T_0 0.5^floor(e / period)

    # refinement KL per token over classes: sum (paper's formula) | mean (official nn.KLDivLoss(): also / C_gt)
    refine_reduction: RefineReduction = "sum"
    # official per-stage Linear-ReLU-Linear (F -> F) on each top-down output before the bottom-up addition
    bottom_up_proj: bool = True
    # Swin stage outputs: timm (as timm gives them) | merged (official: stages 1..L-1 after the next patch merging)
    swin_stages: SwinStages = "timm"

    def _problems(self) -> Iterator[tuple[str, str]]:
        for i, v in enumerate(self.num_selects or []):
            if v >= 1 and not float(v).is_integer():
                yield f"num_selects[{i}]", f"{_num(v)} is neither a token count (integer >= 1) nor a fraction < 1"
        if self.basic is None and self.use_combiner and not self.use_selection:
            yield "use_combiner", (
                "reads the tokens the selector keeps (the official code asserts herbs.use_selection too): "
                "--set herbs.use_combiner=false, or --set herbs.use_selection=true"
            )
        if self.basic is None and self.use_refinement and not self.use_bottom_up:
            why = "the refinement target is the bottom-up classifier"
            yield "use_refinement", (
                f"needs herbs.use_bottom_up ({why}): --set herbs.use_bottom_up=true, "
                "or --set herbs.use_refinement=false"
            )


@dataclass
class RunConfig:
    """A whole run: ``c2f train --config configs/<recipe>.yaml``."""

    name: str = setting("run", pattern=RUN_NAME)  # the run folder out_dir/<name>
    method: Method = "plain"  # METHODS.md §1 (plain), §2 (hdcnn), §3 (herbs)
    out_dir: str = "runs"
    seed: int = setting(0, ge=0)
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

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.data.normalize == "pretrained" and self.model.pretrained is False:
            yield "data.normalize", (
                "pretrained uses the statistics of the weights model.pretrained names, but it is false; "
                "set model.pretrained or data.normalize=auto"
            )
        if self.data.decode_device == "cuda":
            if self.train.device == "cpu":
                yield "data.decode_device", "cuda decodes on the training GPU, but train.device is cpu; set it to cpu"
            if self.data.auto_augment is not None:
                yield "data.decode_device", (
                    f"cuda has no data.auto_augment={quote(self.data.auto_augment)} on the device; "
                    "set data.decode_device=cpu or data.auto_augment=null"
                )
        if self.data.mixing and self.method != "plain":
            keys = "data.mixup_alpha / data.cutmix_alpha"
            yield "data.mixup_alpha", (
                f"{keys} mix labels into soft targets, but method {self.method!r} trains on hard labels; "
                "set both to 0, or use method plain"
            )


# Keys that configs stored in older checkpoints may hold but no code reads any more: ``config_from_dict``
# drops them; a recipe or ``--set`` that names one is refused like any unknown key.
_RETIRED: dict[str, tuple[str, ...]] = {"eval": ("batch_size",)}

# YAML 1.1 (PyYAML) reads 1e-3, 1.0e3 and 1E5 as strings (its floats need a dot and a signed exponent).
_SCIENTIFIC = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+")


# ---- reading YAML ---------------------------------------------------------------------------------
# A recipe is a few KiB of plain values. Anything far beyond that is refused before it can cost time or
# memory: a file or --set value above MAX_YAML_BYTES is not parsed; aliases (``*name``) that expand the
# document beyond MAX_YAML_NODES values (a "billion laughs" of nested anchors) or MAX_YAML_DEPTH levels,
# more than MAX_YAML_ALIASES aliases, or an alias inside its own anchor are refused once the node graph
# is composed (aliases are shared nodes, so it is small) and before any Python value is built.

MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 32
MAX_YAML_ALIASES = 100
MAX_STRING = 4096  # a string setting (a name, a path): no path needs more
MAX_INT = 2**63 - 1  # torch and numpy take 64-bit integers


class _RecipeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """``yaml.safe_load``'s loader for plain values only: a date stays the text written; binary data,
    sets and ordered pairs are refused."""


def _date_as_text(loader: Any, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))


def _not_plain(loader: Any, node: yaml.Node) -> None:
    raise yaml.constructor.ConstructorError(
        None, None, f"the tag {node.tag.rsplit(':', 1)[-1]!r} is not a plain value", node.start_mark
    )


_RecipeLoader.add_constructor("tag:yaml.org,2002:timestamp", _date_as_text)
for _tag in ("binary", "set", "omap", "pairs"):
    _RecipeLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _not_plain)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_node_graph(root: yaml.Node, source: str) -> None:
    """Refuse a composed document whose aliases expand it too far (see MAX_YAML_*): sizes and heights are
    counted once per node (an alias is the same node object), iteratively, so a bomb costs microseconds."""
    size: dict[int, tuple[int, int]] = {}  # id(node) -> (values after expansion, nesting height)
    open_: set[int] = set()  # nodes on the current path: meeting one again is a recursive alias
    edges, stack = 0, [(root, False)]
    while stack:
        node, done = stack.pop()
        kids = _children(node)
        if done:
            open_.discard(id(node))
            sub = [size[id(k)] for k in kids]
            size[id(node)] = (1 + sum(n for n, _ in sub), 1 + max((h for _, h in sub), default=0))
            if size[id(node)][0] > MAX_YAML_NODES:
                raise ConfigError(f"{source}: its aliases expand it to over {MAX_YAML_NODES:,} values (refused)")
            if size[id(node)][1] > MAX_YAML_DEPTH:
                raise ConfigError(f"{source}: nested deeper than {MAX_YAML_DEPTH} levels (refused)")
        elif id(node) in open_:
            raise ConfigError(f"{source}: an alias refers to the value that contains it (refused)")
        elif id(node) not in size:
            open_.add(id(node))
            edges += len(kids)
            stack.append((node, True))
            stack.extend((k, False) for k in kids)
    if edges - (len(size) - 1) > MAX_YAML_ALIASES:  # an edge to a node met before is an alias
        raise ConfigError(f"{source}: more than {MAX_YAML_ALIASES} aliases (refused)")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what and where (its own text spans several lines)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{context + ', ' if context else ''}{problem}{where}"


def parse_yaml(text: str, source: str) -> Any:
    """``text`` (a recipe, a ``--set`` value) as plain data, within the limits above; ``source`` names it."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source} is {len(text):,} characters long; a recipe may hold {MAX_YAML_BYTES:,}")
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node_graph(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {clip(_yaml_problem(exc), 300)}") from None
    except RecursionError:  # the pure-Python composer (no libyaml) recurses once per nesting level
        raise ConfigError(f"{source}: nested deeper than {MAX_YAML_DEPTH} levels (refused)") from None
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        reason = str(exc).split(";")[0]  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise ConfigError(f"{source}: {clip(reason)} (refused)") from None
    finally:
        loader.dispose()


# ---- generic typed loading ----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _choice(value: Any, choices: tuple[Any, ...], where: str, nullable: bool = False) -> Any:
    if isinstance(value, bool) and "off" in choices:  # YAML 1.1 reads off/on/no/yes as booleans
        value = "on" if value else "off"
    if isinstance(value, str) and value in choices:
        return value
    names = ", ".join(map(str, choices)) + (", or null" if nullable else "")
    raise ConfigError(f"{where}: unknown value {quote(value)}; choose one of {names}")


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) > MAX_INT:  # torch / numpy take 64-bit integers
            raise ConfigError(f"{where}: {quote(value)} is too large (at most {MAX_INT})")
        return value
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    got = quote(value)
    if isinstance(value, str):
        got += " (a string; write the number without quotes)" if _is_float(value) else " (a string)"
    raise ConfigError(f"{where}: expected {what}, got {got}")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except (ValueError, OverflowError):
        return False
    return True


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert int->float and dict->dataclass."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: the error of X, which names what is allowed
            if typing.get_origin(options[0]) is Literal:
                return _choice(value, typing.get_args(options[0]), where, nullable=True)
            return _coerce(value, options[0], where)
        for arg in options:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {quote(value)}")
    if origin is Literal:
        return _choice(value, typing.get_args(tp), where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {quote(value)}")
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a single S is a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {quote(value)}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {quote(value)}")
        bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
        if bad:  # the keys become keyword arguments
            raise ConfigError(f"{where}: keys must be names (keyword arguments), got {quote(bad[0])}")
        return dict(value)
    return _scalar(value, tp, where)


def _scalar(value: Any, tp: Any, where: str) -> Any:
    """``value`` as a bool, float, int or str setting."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {quote(value)}")
    if tp is float:
        number = _number(value, where, "a number")
        try:
            return float(number)
        except OverflowError:
            raise ConfigError(f"{where}: {quote(number)} is too large for a number") from None
    if tp is int:
        number = _number(value, where, "an integer")
        if isinstance(number, int) or float(number).is_integer():
            return int(_number(int(number), where, "an integer"))  # a float such as 1e30 is checked as an int
        raise ConfigError(f"{where}: expected an integer, got {quote(value)}")
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {quote(value)}")
        if len(value) > MAX_STRING or "\x00" in value:  # names and paths: no NUL, no megabyte path
            why = "holds a NUL character" if "\x00" in value else f"is longer than {MAX_STRING} characters"
            raise ConfigError(f"{where}: {quote(value)} {why}")
        return value
    return value


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where != "config" else name


def _check_values(obj: Any, where: str) -> None:
    """The declared ranges and patterns of every field of ``obj``, then its combination rules."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), _key(where, f.name)
        bounds: Range | None = f.metadata.get("range")
        if bounds is not None and value is not None:
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, v in items:
                if v not in bounds or v in (math.inf, -math.inf):  # nan is outside every range
                    finite = " and finite" if v in (math.inf, -math.inf) else ""
                    name = key if i is None else f"{key}[{i}]"
                    raise ConfigError(f"{name}: must be {bounds}{finite}, got {_num(v)}")
        pattern = f.metadata.get("pattern")
        if pattern is not None and not re.fullmatch(pattern[0], value):
            raise ConfigError(f"{key}: unknown value {quote(value)}; use {pattern[1]}")
    problems = getattr(obj, "_problems", None)
    for name, message in problems() if problems else ():
        raise ConfigError(f"{_key(where, name)}: {message}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data`` and validate it; unknown keys are an error listing the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted((k for k in data if k not in names), key=lambda k: quote(k, 60))  # keys of any type
    if unknown:
        retired = [k for k in unknown if k in _RETIRED.get(where, ())]
        note = f" ({', '.join(retired)}: retired, no longer read; delete it)" if retired else ""
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        shown = ", ".join(quote(k, 60) for k in unknown[:5]) + more
        raise ConfigError(f"{where}: unknown key(s) {shown}{note}; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], _key(where, k)) for k, v in data.items()}
    obj = cls(**kwargs)
    _check_values(obj, where)
    return obj


def validate(cfg: T, where: str = "config") -> T:
    """Check a config or one section built in Python (``TrainConfig(...)``, ``dataclasses.replace``) as
    loading would; ``where`` names the section in messages (``train`` for a ``TrainConfig``)."""
    return from_dict(type(cfg), to_dict(cfg), where)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {quote(item)}: expected key=value, e.g. train.epochs=5")
    key, raw = item.split("=", 1)
    value = parse_yaml(raw, f"--set {quote(item, 80)}: the value") if raw != "" else None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (values parsed as YAML, with the limits of a recipe)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {quote(item)}: {quote(key)} is not a section")
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe file as a mapping; refused unread when it is not a regular file or above ``MAX_YAML_BYTES``."""
    path = Path(path)
    name = f"config file {quote(str(path))}"
    if path.is_dir():
        raise ConfigError(f"{name} is a directory, not a recipe")
    if not path.exists():
        raise ConfigError(f"{name} does not exist")
    try:
        if not path.is_file():
            raise ConfigError(f"{name} is not a regular file")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{name} holds {path.stat().st_size:,} bytes; a recipe may hold {MAX_YAML_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{name} cannot be read: {exc.strerror or exc}") from None
    data = parse_yaml(text, name)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{clip(str(path))}: {exc}") from exc
        raise


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a resolved config stored by an earlier run (e.g. in a checkpoint); retired keys are dropped."""
    data = dict(data)
    for section, keys in _RETIRED.items():
        if isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if k not in keys}
    return from_dict(RunConfig, data)


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``cfg`` (e.g. a checkpoint's) with ``--set`` overrides, validated like a recipe."""
    return from_dict(RunConfig, apply_overrides(to_dict(cfg), overrides)) if overrides else cfg
