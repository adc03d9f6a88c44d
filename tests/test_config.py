"""Typed recipes: defaults, overrides, unknown keys, wrong types, values outside a Literal or a declared
range and impossible combinations are errors naming the key (``section.key``, as ``--set`` spells it)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from coarse2fine.config import (
    HERBSConfig,
    OptimConfig,
    Range,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    to_dict,
    validate,
    with_overrides,
)
from coarse2fine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}


def _fields() -> list[tuple[str, Any, dataclasses.Field[Any]]]:
    """(key as --set spells it, annotation, field) of every setting."""
    out = []
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name not in _sections():
            out.append((f.name, hints[f.name], f))
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        out += [(f"{section}.{f.name}", hints[f.name], f) for f in dataclasses.fields(cls)]
    return out


def _choices(tp: Any) -> tuple[tuple[str, ...], bool] | None:
    """(choices, nullable) of a Literal or Literal | None annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp), False
    if len(args) == 1 and typing.get_origin(args[0]) is Literal and typing.get_origin(tp) is not list:
        return typing.get_args(args[0]), True  # (a list of Literals, e.g. train.loggers: tests/test_loggers.py)
    return None


LITERALS = [(key, *_choices(tp)) for key, tp, _ in _fields() if _choices(tp)]
RANGED = [(key, f.metadata["range"]) for key, _, f in _fields() if "range" in f.metadata]


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    assert cfg.name and cfg.data.batch_size > 0
    assert config_from_dict(to_dict(cfg)) == cfg  # what a run stores loads back


def test_defaults_are_valid() -> None:
    assert validate(RunConfig()) == RunConfig()


def test_the_choices_listed_in_comments_are_literal_types() -> None:
    keys = {key for key, _, _ in LITERALS}
    assert {"method", "data.name", "data.label", "data.bad_images", "model.init", "optim.name", "schedule.name"} <= keys
    assert {"train.amp", "train.nan_policy", "eval.protocol", "hdcnn.clustering", "hdcnn.coarse_targets"} <= keys
    assert {"hdcnn.fine_head_init", "hdcnn.fine_exec", "herbs.rank_by", "herbs.basic", "herbs.combiner_pool"} <= keys


@pytest.mark.parametrize(("key", "choices", "nullable"), LITERALS, ids=[k for k, _, _ in LITERALS])
def test_a_value_outside_a_literal_names_the_key_and_the_choices(
    key: str, choices: tuple[str, ...], nullable: bool
) -> None:
    expected = f"{key}: unknown value 'bogus'; choose one of {', '.join(choices)}" + (", or null" if nullable else "")
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=bogus"])
    assert str(err.value) == expected
    needs = {
        ("data.label", "coarse"): ["data.name=cifar100"],
        ("train.best_on", "ema"): ["train.ema_decay=0.999"],
        ("data.cache", "on"): ["data.name=folder"],
        ("data.normalize", "pretrained"): ["model.pretrained=true"],
    }
    for choice in choices:  # every choice loads (YAML 1.1 reads `off` as false: still the string "off")
        cfg = load_config(None, [f"{key}={choice}", *needs.get((key, choice), [])])
        section, _, name = key.rpartition(".")
        assert getattr(getattr(cfg, section) if section else cfg, name) == choice


def test_yaml_on_is_not_an_amp_setting() -> None:
    with pytest.raises(ConfigError, match=r"train\.amp: unknown value 'on'; choose one of auto, bf16, fp16, off"):
        load_config(None, ["train.amp=on"])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_accepts_auto_cpu_cuda_and_cuda_n(device: str) -> None:
    assert load_config(None, [f"train.device={device}"]).train.device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:-1", "cuda:x", "CUDA", "cpu0"])
def test_device_outside_the_pattern_is_refused(device: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.device: unknown value .*; use auto, cpu, cuda or cuda:N"):
        load_config(None, [f"train.device={device}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", "seed: must be >= 0, got -1"),
        ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
        ("data.val_fraction=0", "data.val_fraction: must be in (0, 1), got 0"),
        ("data.eval_batch_size=0", "data.eval_batch_size: must be >= 1, got 0"),
        ("data.train_scale=[256, 0]", "data.train_scale[1]: must be >= 1, got 0"),
        ("optim.lr=-1", "optim.lr: must be >= 0, got -1"),
        ("optim.momentum=1", "optim.momentum: must be in [0, 1), got 1"),
        ("optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0, got -0.1"),
        ("schedule.plateau_factor=1", "schedule.plateau_factor: must be in (0, 1), got 1"),
        ("schedule.warmup_steps=-1", "schedule.warmup_steps: must be >= 0, got -1"),
        ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
        ("train.label_smoothing=1", "train.label_smoothing: must be in [0, 1), got 1"),
        ("train.grad_clip=0", "train.grad_clip: must be > 0, got 0"),
        ("train.threads=0", "train.threads: must be in [1, 1024], got 0"),
        ("eval.scales=[224, 0]", "eval.scales[1]: must be >= 1, got 0"),
        ("hdcnn.num_coarse=0", "hdcnn.num_coarse: must be >= 1, got 0"),
        ("hdcnn.beta=-1", "hdcnn.beta: must be > 0, got -1"),
        ("hdcnn.fine_epochs=-1", "hdcnn.fine_epochs: must be >= 0, got -1"),
        ("hdcnn.beta_sweep=[1, -2]", "hdcnn.beta_sweep[1]: must be > 0, got -2"),
        ("herbs.temperature=0", "herbs.temperature: must be > 0, got 0"),
        ("herbs.num_selects=[0.5, 0]", "herbs.num_selects[1]: must be > 0, got 0"),
        ("herbs.lambda_dropped=-1", "herbs.lambda_dropped: must be >= 0, got -1"),
        ("optim.lr=.nan", "optim.lr: must be >= 0, got nan"),
    ],
)
def test_a_value_outside_its_range_names_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def _outside(r: Range) -> float:
    if r.ge is not None:
        return r.ge - 1
    if r.gt is not None:
        return r.gt
    return r.le + 1 if r.le is not None else r.lt  # type: ignore[operator,return-value]


@pytest.mark.parametrize(("key", "bounds"), RANGED, ids=[k for k, _ in RANGED])
def test_every_declared_range_is_checked_at_load(key: str, bounds: Range) -> None:
    bad = _outside(bounds)
    if bad in bounds:
        pytest.skip("no number outside the range")
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}(\[0\])?: must be {re.escape(str(bounds))}, got"):
        load_config(None, [f"{key}={bad}"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train_scale=[512, 256]"], r"data\.train_scale: give \[S\] or \[S_min, S_max\] with S_min <= S_max"),
        (["data.train_scale=[256, 384, 512]"], r"data\.train_scale: give \[S\] or \[S_min, S_max\]"),
        (["data.image_size=224", "data.train_scale=[200, 512]"], r"data\.train_scale: S=200 is smaller than the crop"),
        (["data.image_size=224", "data.test_scale=200"], r"data\.test_scale: Q=200 is smaller than the crop"),
        (["data.label=coarse"], r"data\.label: 'coarse' exists for data\.name=cifar100 only, not 'fashion_mnist'"),
        (["data.test_fraction=0.1"], r"data\.test_fraction: applies to data\.name=folder only, not 'fashion_mnist'"),
        (["data.split_file=s.csv"], r"data\.split_file: applies to data\.name=folder only"),
        (["data.cache=on"], r"data\.cache: 'on' applies to data\.name=folder only"),
        (["eval.scales=[]"], r"eval\.scales: give at least one test scale Q"),
        (["herbs.num_selects=[2.5]"], r"herbs\.num_selects\[0\]: 2\.5 is neither a token count"),
        (["herbs.use_bottom_up=false"], r"herbs\.use_refinement: needs herbs\.use_bottom_up"),
        (["herbs.use_selection=false"], r"herbs\.use_combiner: reads the tokens the selector keeps"),
        (["data.normalize=pretrained"], r"^data\.normalize: pretrained uses the statistics"),
        (["train.best_on=ema"], r"^train\.best_on: 'ema' needs train\.ema_decay"),
        (["method=herbs", "data.cutmix_alpha=1"], r"^data\.mixup_alpha: .*method 'herbs' trains on hard labels"),
        (["method=hdcnn", "data.mixup_alpha=0.2"], r"^data\.mixup_alpha: .*method 'hdcnn' trains on hard labels"),
        (["model.pretrained=true", "model.pretrained_file=w.pt"], r"^model\.pretrained: give model\.pretrained or"),
        (["model.pretrained=a1_in1k", "model.init_from=a.pt"], r"^model\.pretrained: .*not both"),
        (["model.pretrained=' '"], r"^model\.pretrained: give true, false, a timm tag"),
        (["model.pretrained=3"], r"^model\.pretrained: expected bool \| str, got 3"),
    ],
)
def test_impossible_combinations_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_possible_combinations_load() -> None:
    assert load_config(None, ["data.train_scale=[256, 256]"]).data.train_scale == [256, 256]
    assert load_config(None, ["data.label=coarse", "data.name=cifar100"]).data.label == "coarse"
    assert load_config(None, ["herbs.use_bottom_up=false", "herbs.use_refinement=false"]).herbs.use_bottom_up is False
    assert load_config(None, ["herbs.use_bottom_up=false", "herbs.basic=refine"]).herbs.basic == "refine"
    nosel = load_config(None, ["herbs.use_selection=false", "herbs.use_combiner=false"]).herbs
    assert not nosel.use_selection and not nosel.use_combiner
    assert load_config(None, ["herbs.num_selects=[64, 0.25, 3.0]"]).herbs.num_selects == [64, 0.25, 3]
    assert load_config(None, ["data.mixup_alpha=0.2", "data.cutmix_alpha=1"]).data.mixing
    assert load_config(None, ["method=herbs", "data.random_erase=0.25", "data.auto_augment=rand"]).data.random_erase
    ema = load_config(None, ["train.ema_decay=0.999", "train.best_on=ema"]).train
    assert (ema.ema_decay, ema.best_on, ema.ema_warmup) == (0.999, "ema", False)
    for value, expected in (("true", True), ("false", False), ("hf-hub:timm/resnet18.a1_in1k", None)):
        pretrained = load_config(None, [f"model.pretrained={value}"]).model.pretrained
        assert pretrained == (value if expected is None else expected)


def test_a_config_built_in_python_is_checked_by_validate() -> None:
    validate(dataclasses.replace(RunConfig(), herbs=HERBSConfig(basic="bs")))
    with pytest.raises(ConfigError, match=r"^optim\.name: unknown value 'lamb'; choose one of sgd, adamw$"):
        validate(dataclasses.replace(RunConfig(), optim=OptimConfig(name="lamb")))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be >= 0, got -0.1$"):
        validate(dataclasses.replace(RunConfig(), optim=OptimConfig(lr=-0.1)))


@pytest.mark.parametrize(
    ("text", "override", "message"),
    [
        ("optim: {lr: '0.1'}", "optim.lr='0.1'", "optim.lr: expected a number, got '0.1'"),
        ('schedule: {min_lr: "1e-6x"}', 'schedule.min_lr="1e-6x"', "schedule.min_lr: expected a number, got '1e-6x'"),
        ("train: {epochs: '3'}", "train.epochs='3'", "train.epochs: expected an integer, got '3'"),
        ("hdcnn: {beta_sweep: [1.0, '2.0']}", "hdcnn.beta_sweep=[1, '2.0']", "hdcnn.beta_sweep[1]: expected a number"),
    ],
)
def test_quoted_numbers_are_refused(tmp_path: Path, text: str, override: str, message: str) -> None:
    recipe = tmp_path / "quoted.yaml"
    recipe.write_text(text + "\n")
    for load in (lambda: load_config(recipe), lambda: load_config(None, [override])):
        with pytest.raises(ConfigError, match=re.escape(message) + r".* \(a string"):
            load()


def test_scientific_notation_that_yaml_reads_as_a_string_is_a_number(tmp_path: Path) -> None:
    recipe = tmp_path / "sci.yaml"
    recipe.write_text("optim: {lr: 1e-3, weight_decay: 5E-4}\nschedule: {min_lr: 1.0e-6, warmup_steps: 1e2}\n")
    cfg = load_config(recipe, ["hdcnn.gamma=2e+0", "herbs.temperature=6.4e1"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.min_lr) == pytest.approx((1e-3, 5e-4, 1e-6))
    assert cfg.schedule.warmup_steps == 100 and isinstance(cfg.schedule.warmup_steps, int)
    assert (cfg.hdcnn.gamma, cfg.herbs.temperature) == (2.0, 64.0)


def _stored_with_retired_keys() -> dict[str, Any]:
    stored = to_dict(RunConfig())
    stored["eval"]["batch_size"] = None  # written by runs before the key was retired (tests/fixtures/legacy)
    return stored


def test_retired_keys_of_a_stored_config_are_dropped() -> None:
    assert config_from_dict(_stored_with_retired_keys()) == RunConfig()


def test_retired_keys_are_refused_in_a_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "old.yaml"
    recipe.write_text("eval: {protocol: center, batch_size: 64}\n")
    for load in (lambda: load_config(recipe), lambda: load_config(None, ["eval.batch_size=64"])):
        with pytest.raises(ConfigError, match=r"eval: unknown key\(s\) 'batch_size' \(batch_size: retired"):
            load()
    with pytest.raises(ConfigError, match=r"'batch_size'"):  # nor added to a stored config by --set
        with_overrides(config_from_dict(_stored_with_retired_keys()), ["eval.batch_size=64"])


def test_lower_layers_know_the_same_choices() -> None:
    """The recipe vocabulary (config's Literal types) and the tuples of the modules that also take plain
    arguments from Python stay the same."""
    from coarse2fine import config as C
    from coarse2fine.data.base import BAD_IMAGE_POLICIES
    from coarse2fine.data.cache import CACHE_MODES
    from coarse2fine.data.registry import DATASETS
    from coarse2fine.data.transforms import AUTO_AUGMENTS
    from coarse2fine.engine.protocols import PROTOCOLS
    from coarse2fine.hdcnn.model import FINE_EXEC
    from coarse2fine.herbs.combiner import POOLS
    from coarse2fine.herbs.selector import RANKINGS
    from coarse2fine.hierarchy.learn import CLUSTERING_METHODS as CLUSTERINGS
    from coarse2fine.hierarchy.learn import COARSE_TARGET_RULES
    from coarse2fine.models.vgg import INITS
    from coarse2fine.recipes.models import METHODS

    pairs = [
        (C.DatasetName, DATASETS),
        (C.BadImages, BAD_IMAGE_POLICIES),
        (C.CacheMode, CACHE_MODES),
        (C.TestProtocol, PROTOCOLS),
        (C.FineExec, FINE_EXEC),
        (C.CombinerPool, POOLS),
        (C.RankBy, RANKINGS),
        (C.CoarseTargets, COARSE_TARGET_RULES),
        (C.Clustering, CLUSTERINGS),
        (C.Init, INITS),
        (C.Method, METHODS),
        (C.AutoAugment, AUTO_AUGMENTS),
    ]
    for literal, known in pairs:
        assert set(typing.get_args(literal)) == set(known), literal


def test_overrides_are_parsed_as_yaml_and_typed(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: a\ntrain: {epochs: 3}\n")
    cfg = load_config(recipe, ["train.epochs=7", "optim.lr=1e-3", "data.train_scale=[256, 512]", "optim.nesterov=true"])
    assert cfg.train.epochs == 7
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.train_scale == [256, 512]
    assert cfg.optim.nesterov is True
    assert cfg.name == "a"


def test_single_scale_becomes_a_list() -> None:
    assert load_config(None, ["data.train_scale=256"]).data.train_scale == [256]


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train: {epochz: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    msg = str(err.value)
    assert "epochz" in msg and "epochs" in msg and str(recipe) in msg


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config(None, ["bogus=1"])


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.epochs=ten", "train.epochs"), ("optim.lr=fast", "optim.lr"), ("train.channels_last=3", "channels_last")],
)
def test_wrong_value_type_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_resolved_config_round_trips() -> None:
    cfg = load_config(None, ["train.epochs=2", "hdcnn.num_coarse=3"])
    again = config_from_dict(to_dict(cfg))
    assert again == cfg


def test_override_into_scalar_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_yaml_off_is_read_as_the_string_off() -> None:
    assert load_config(None, ["train.amp=off"]).train.amp == "off"


def test_model_initialisation_follows_the_recipe_seed() -> None:
    """Fresh processes start torch's generator from a random seed: the builder seeds from ``seed``."""
    import torch

    from coarse2fine.recipes import build_backbone

    cfg = load_config(None, ["model.name=vgg_small_bn", "seed=3"])
    first = build_backbone(cfg, 10, 1).state_dict()
    torch.rand(1000)  # whatever used the generator before does not matter
    again = build_backbone(cfg, 10, 1).state_dict()
    other = build_backbone(load_config(None, ["model.name=vgg_small_bn", "seed=4"]), 10, 1).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["stage1.conv1.weight"], other["stage1.conv1.weight"])
