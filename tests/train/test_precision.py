"""Mixed-precision training: the compute_dtype setting, checked, resolved and used."""

import platform
import re
from pathlib import Path

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.hardware import X86_MACHINES, native_bfloat16
from lorakit.train.config import TrainConfig
from lorakit.train.precision import (
    PLAIN_ATTENTION_MAX_KEYS,
    compute_context,
    resolved_compute_dtype,
)


def test_auto_is_bfloat16_only_where_the_device_has_it_natively():
    cpu = torch.device("cpu")
    assert resolved_compute_dtype("auto", cpu) == ("bfloat16" if native_bfloat16(cpu) else "float32")
    assert resolved_compute_dtype("float16", cpu) == "float16"
    assert resolved_compute_dtype("auto", torch.device("meta")) == "float32"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or platform.machine().lower() not in X86_MACHINES,
                    reason="reads the x86 CPU flags Linux lists")
def test_native_bfloat16_on_an_x86_cpu_means_avx512_bf16_or_amx_not_avx512_alone():
    first = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    flags = set(first.group(1).split())
    assert native_bfloat16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_the_forward_runs_its_products_in_the_compute_dtype_and_nothing_else_changes():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with compute_context("bfloat16", torch.device("cpu"))():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with compute_context("float32", torch.device("cpu"))():
        assert layer(x).dtype == torch.float32


def test_short_half_precision_batches_on_a_cpu_take_the_plain_attention_kernel():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)  # (rows, heads, positions, head width)

    def kernel(dtype: str, keys: int) -> str:
        with compute_context(dtype, torch.device("cpu"))(keys):
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return type(out.grad_fn).__name__

    assert "FlashAttention" not in kernel("bfloat16", 8)
    assert "FlashAttention" in kernel("bfloat16", PLAIN_ATTENTION_MAX_KEYS + 1)  # long: the fused kernel
    assert "FlashAttention" in kernel("bfloat16", 0)  # length unknown: left to PyTorch
    assert "FlashAttention" in kernel("float32", 8)  # float32: fused is as fast at every length


def test_an_unknown_compute_dtype_is_refused_by_name():
    with pytest.raises(ConfigError, match="compute_dtype must be one of"):
        TrainConfig(train="x.jsonl", compute_dtype="int8")


def test_a_bfloat16_run_follows_the_float32_one_and_saves_float32_adapters(tiny_base_dir, data_dir, tmp_path,
                                                                          capsys):
    from safetensors.torch import load_file

    from lorakit.train.loop import train
    from tests.train.test_loop import _config

    exact = train(_config(tiny_base_dir, data_dir, tmp_path / "fp32", max_steps=4, dropout=0.0, progress=True))
    assert "products" not in capsys.readouterr().err
    mixed = train(_config(tiny_base_dir, data_dir, tmp_path / "bf16", max_steps=4, dropout=0.0,
                          compute_dtype="bfloat16", progress=True))
    assert "on cpu with bfloat16 products" in capsys.readouterr().err  # the summary says what ran
    assert mixed.losses != exact.losses  # the products did run in bfloat16 ...
    assert mixed.losses == pytest.approx(exact.losses, rel=2e-2)  # ... to within its rounding
    tensors = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
