"""Typed recipes: defaults, overrides, unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from coarse2fine.config import RunConfig, apply_overrides, config_from_dict, load_config, to_dict
from coarse2fine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    assert cfg.name and cfg.data.batch_size > 0


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
