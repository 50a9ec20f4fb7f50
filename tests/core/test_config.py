import math

import pytest

from lorakit import ConfigError, LoraConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
        ({"target_modules": []}, "target_modules is an empty list"),
        ({"target_modules": "("}, "not a valid regular expression"),
        ({"target_modules": ["q_proj", ""]}, "non-empty strings"),
        ({"bias": "some"}, "bias must be one of none, all, lora_only"),
        ({"init": "pissa_niter_x"}, "init must be one of default, gaussian"),
        ({"use_dora": 1}, "use_dora must be true or false"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"alpha_pattern": {"[": 4}}, "not a valid regular expression"),
        ({"modules_to_save": "score"}, "modules_to_save must be a list"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    ],
)
def test_invalid_values_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_lists_are_normalised_and_config_is_immutable():
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert cfg.modules_to_save == ("score",)
    with pytest.raises(AttributeError):
        cfg.r = 4


def test_scaling_plain_and_rank_stabilised():
    assert LoraConfig(r=8, alpha=16).scaling_for("x") == 2.0
    assert LoraConfig(r=16, alpha=16, use_rslora=True).scaling_for("x") == pytest.approx(16 / math.sqrt(16))


def test_rank_and_alpha_patterns_match_the_end_of_a_module_name():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\..*": 2}, alpha_pattern={"v_proj": 4})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.rank_for("model.layers.1.mlp.up_proj") == 2
    assert cfg.rank_for("model.layers.0.self_attn.xq_proj") == 8  # no match inside a name segment
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 16 / 4


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("field", ["alpha", "dropout"])
def test_every_float_setting_refuses_nan_and_infinity(field, value):
    with pytest.raises(ConfigError, match=field):
        LoraConfig(**{field: value})
    with pytest.raises(ConfigError, match="alpha_pattern"):
        LoraConfig(alpha_pattern={"q_proj": value})


@pytest.mark.parametrize(("patterns", "name", "expected"), [
    (("q_proj",), "model.layers.0.self_attn.q_proj", True),  # a list entry: the name's last part
    (("self_attn.q_proj",), "model.layers.0.self_attn.q_proj", True),  # or any dotted suffix
    (("model.layers.0.self_attn.q_proj",), "model.layers.0.self_attn.q_proj", True),  # or the whole name
    (("proj",), "model.layers.0.self_attn.q_proj", False),  # never part of a word
    (("attn.q",), "model.layers.0.self_attn.q_proj", False),
    (("layers.0",), "model.layers.0.self_attn.q_proj", False),  # never a prefix
    (("q_proj",), "q_proj", True),
    (r".*\.(q|v)_proj", "model.layers.0.self_attn.v_proj", True),  # a string: a regex over the whole name
    (r"(q|v)_proj", "model.layers.0.self_attn.v_proj", False),
    (None, "model.layers.0.self_attn.q_proj", False),  # no patterns (exclude_modules unset): nothing
])
def test_module_names_match_as_peft_matches_them(patterns, name, expected):
    from lorakit.core.config import module_matcher

    assert module_matcher(patterns)(name) is expected
