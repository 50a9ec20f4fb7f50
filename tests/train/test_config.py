"""TrainConfig: YAML recipes, flag overrides, and clear errors for bad settings."""

import argparse
import math

import pytest

from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig, add_arguments, from_sources


def _args(*flags):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(flags))


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nr: 4\ntarget_modules: [q_proj, v_proj]\nval: ''\n", encoding="utf-8")
    config = from_sources(recipe, _args("--r", "8", "--no-progress", "--target-modules", "k_proj"))
    assert config.lr == 1e-3  # YAML 1.1 reads "1e-3" as a string; it is taken as the number
    assert config.r == 8 and config.progress is False
    assert config.lora_targets() == ("k_proj",)
    assert config.val is None
    assert config.batch_size == TrainConfig().batch_size


def test_the_demo_recipe_is_valid():
    config = from_sources("configs/smollm2-orders.yaml", None)
    assert config.base == "smollm2" and config.lora_targets() == "all-linear"
    assert config.copy_fields == ["item", "deliver_to"]  # the fields make demo's eval copies


@pytest.mark.parametrize(("yaml_text", "flags"), [
    ("copy_fields: [item, deliver_to]\n", []),
    ("copy_fields: item,deliver_to\n", []),
    ("", ["--copy-fields", "item,deliver_to"]),  # eval's spelling
    ("", ["--copy-fields", "item", "deliver_to"]),
])
def test_copy_fields_read_as_a_list_or_as_eval_writes_them(tmp_path, yaml_text, flags):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml_text, encoding="utf-8")
    assert from_sources(recipe, _args(*flags)).copy_fields == ["item", "deliver_to"]
    assert TrainConfig().copy_fields == []
    assert from_sources(recipe, _args("--copy-fields", "none")).copy_fields == []  # off, as in eval


@pytest.mark.parametrize(("yaml_text", "problem"), [
    ("learning_rate: 0.1\n", "unknown setting.*learning_rate.*valid settings"),
    ("lr: fast\n", "lr must be a number"),
    ("r: 0\n", "r must be a positive integer"),
    ("dtype: int8\n", "dtype must be one of"),
    ("- a list\n", "expected a mapping"),
    ("lr: [\n", "not valid YAML"),
    ("copy_fields: 3\n", "copy_fields must be JSON keys"),
])
def test_bad_recipes_are_one_clear_error(tmp_path, yaml_text, problem):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ConfigError, match=problem):
        from_sources(recipe, None)


def test_a_missing_recipe_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        from_sources(tmp_path / "none.yaml", None)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("field", ["alpha", "dropout", "lr", "weight_decay", "min_lr_ratio", "max_grad_norm"])
def test_every_float_setting_is_finite_or_a_one_line_error(field, value, tmp_path):
    """NaN slips past `value < 0` (comparisons with NaN are false): a NaN max_grad_norm turned clipping
    off, a NaN weight_decay wrote NaN adapters. Each is refused by name, from YAML or in code."""
    with pytest.raises(ConfigError, match=f"{field} must be"):
        TrainConfig(**{field: value})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{field}: .nan\n" if math.isnan(value) else f"{field}: .inf\n")
    with pytest.raises(ConfigError, match=f"{field} must be"):
        from_sources(recipe, None)
