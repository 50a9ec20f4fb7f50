"""LoRA's variants in the training loop (DoRA, PiSSA/OLoRA, rsLoRA, LoRA+): each trains, resumes
exactly, and leaves a file that loads on the untouched base with the model it trained."""

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError
from lorakit.models.base import load_base
from lorakit.train.loop import train
from lorakit.train.optimizer import make_optimizer
from tests.train.test_loop import _config

VARIANTS = {
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa_niter_2"},
    "olora+rslora": {"init": "olora", "use_rslora": True},
    "loraplus": {"loraplus_lr_ratio": 16.0},
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_a_variant_resumes_exactly_and_its_file_loads_on_the_untouched_base(variant, tiny_base_dir, data_dir,
                                                                               tmp_path):
    settings = VARIANTS[variant]
    whole = train(_config(tiny_base_dir, data_dir, tmp_path / "whole", **settings))
    stopped = train(_config(tiny_base_dir, data_dir, tmp_path / "split", save_every=3, **settings), stop_after=3)
    resumed = train(_config(tiny_base_dir, data_dir, tmp_path / "split", save_every=3, **settings), resume=True)
    assert stopped.losses + resumed.losses == whole.losses  # bit for bit
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = lorakit.read_adapter_config(tmp_path / "whole")
    assert config.use_dora == settings.get("use_dora", False) and config.init == "default"
    assert config.r == (8 if "init" in settings else 4)  # PiSSA/OLoRA: saved as rank 2r for the untouched base
    if "use_dora" in settings:
        assert any(k.endswith("lora_magnitude_vector") for k in a)

    model, tokenizer = load_base(str(tiny_base_dir))
    lorakit.load_adapter(model, tmp_path / "whole")
    ids = tokenizer("one pizza to 5 Elm St", return_tensors="pt").input_ids
    with torch.no_grad():
        with_adapter = model(ids).logits
        with lorakit.disable_adapters(model):
            base = model(ids).logits
    assert (with_adapter - base).abs().max() > 1e-3  # it trained, and loading applies it to the original weights


def test_loraplus_puts_b_in_a_group_of_its_own_at_the_ratio():
    layer = lorakit.Linear(8, 8, r=2)
    slots = {"x.lora_A.weight": layer.lora["default"].lora_A, "x.lora_B.weight": layer.lora["default"].lora_B}
    optimizer = make_optimizer(slots, 1e-3, 0.0, loraplus_lr_ratio=16)
    assert [(g["params"][0] is slots[k], g["lr"]) for g, k in zip(optimizer.param_groups, slots)] == \
        [(True, 1e-3), (True, 1.6e-2)]


def test_the_optimizer_takes_adamws_fused_kernel_for_plain_float_parameters_only():
    layer = lorakit.Linear(8, 8, r=2)
    slots = {"x.lora_A.weight": layer.lora["default"].lora_A, "x.lora_B.weight": layer.lora["default"].lora_B}
    assert make_optimizer(slots, 1e-3, 0.0).defaults["fused"] is True
    assert make_optimizer(slots, 1e-3, 0.0, loraplus_lr_ratio=16).defaults["fused"] is True
    complex_slots = {"z": torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))}  # not a fused dtype
    assert make_optimizer(complex_slots, 1e-3, 0.0).defaults["fused"] is None


def test_variants_are_loras_settings_only(tiny_base_dir, data_dir, tmp_path):
    with pytest.raises(ConfigError, match="use_dora are LoRA's settings"):
        _config(tiny_base_dir, data_dir, tmp_path, method="ia3", use_dora=True)
    with pytest.raises(ConfigError, match="QA-LoRA, whose exact merge"):
        _config(tiny_base_dir, data_dir, tmp_path, quant_bits=4, init="pissa")
    with pytest.raises(ConfigError, match="init must be one of"):
        _config(tiny_base_dir, data_dir, tmp_path, init="svd")
