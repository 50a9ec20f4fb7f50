"""The finiteness check every adapter file passes before it is used."""

import pytest
import torch

from lorakit.core.checks import first_non_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_first_non_finite_names_the_tensor_whatever_its_dtype(bad):
    tensors = {"a": torch.ones(3, 4), "b": torch.ones(5, dtype=torch.bfloat16), "c": torch.zeros(0)}
    assert first_non_finite(tensors) is None and first_non_finite({}) is None
    tensors["b"][2] = bad
    assert first_non_finite(tensors) == "b"
    # Finite values whose float32 sum overflows are not taken for infinities.
    assert first_non_finite({"big": torch.full((4,), 3e38)}) is None
