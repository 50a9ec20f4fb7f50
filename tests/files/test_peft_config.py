"""adapter_config.json: PEFT's field names, and every key accounted for."""

import pytest

from lorakit import ConfigError, LoraConfig
from lorakit.files.peft_config import from_peft_dict, to_peft_dict


def test_peft_dict_round_trip_keeps_every_field():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj"], exclude_modules=["lm_head"], bias="all",
                     modules_to_save=["score"], use_rslora=True, init="gaussian", rank_pattern={"q": 2},
                     alpha_pattern={"q": 3.0}, base_model_name_or_path="org/model", task_type="CAUSAL_LM")
    data = to_peft_dict(cfg, ["q_proj"])
    assert data["lora_alpha"] == 8 and data["lora_dropout"] == 0.1 and data["peft_type"] == "LORA"
    assert from_peft_dict(data) == cfg


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("layers_to_transform", [0, 1], "layer selection"),
        ("lora_bias", True, "lora_B"),
        ("some_future_flag", True, "not supported"),
        ("init_lora_weights", "pissa", "changes the base weights"),
        ("peft_type", "IA3", "LoRA adapters only"),
    ],
)
def test_peft_features_lorakit_lacks_are_errors_not_ignored(key, value, message):
    data = to_peft_dict(LoraConfig(target_modules=["q_proj"]), ["q_proj"])
    data[key] = value
    with pytest.raises(ConfigError, match=message):
        from_peft_dict(data)


def test_features_that_are_off_are_accepted():
    data = to_peft_dict(LoraConfig(target_modules=["q_proj"]), ["q_proj"])
    data.update(use_dora=False, eva_config=None, loftq_config={}, peft_version="0.99", megatron_core="megatron.core")
    assert from_peft_dict(data).target_modules == ("q_proj",)
