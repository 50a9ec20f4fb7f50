"""Each layer family used directly (loralib-style drop-in) against a float64 dense reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.core.layers import LoraLayer
from tests.conftest import randomize_adapters

DTYPE = torch.float64


def dense_weight(layer: LoraLayer) -> torch.Tensor:
    """W + s * B @ A formed explicitly, in the weight's layout: the maths the layer must compute."""
    adapter = layer.lora["default"]
    delta = adapter.scaling * (adapter.lora_B.flatten(1) @ adapter.lora_A.flatten(1))
    if isinstance(layer, nn.Embedding):
        return layer.weight + delta.T
    return layer.weight + delta.view(layer.weight.shape)


LAYERS = {
    "linear": (lambda: lorakit.Linear(12, 6, r=4, alpha=8, dtype=DTYPE),
               lambda: torch.randn(3, 5, 12, dtype=DTYPE),
               lambda layer, x, w: F.linear(x, w, layer.bias)),
    "conv2d": (lambda: lorakit.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1, r=2, alpha=3, dtype=DTYPE),
               lambda: torch.randn(2, 3, 7, 7, dtype=DTYPE),
               lambda layer, x, w: F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation)),
    "conv2d_dilated": (lambda: lorakit.Conv2d(3, 5, (3, 1), padding=(2, 0), dilation=(2, 1), r=2, dtype=DTYPE),
                       lambda: torch.randn(2, 3, 7, 6, dtype=DTYPE),
                       lambda layer, x, w: F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation)),
    "conv1d": (lambda: lorakit.Conv1d(4, 6, 5, padding=2, r=3, dtype=DTYPE),
               lambda: torch.randn(2, 4, 11, dtype=DTYPE),
               lambda layer, x, w: F.conv1d(x, w, layer.bias, layer.stride, layer.padding)),
    "embedding": (lambda: lorakit.Embedding(20, 6, padding_idx=0, r=3, dtype=DTYPE),
                  lambda: torch.randint(0, 20, (2, 8)),
                  lambda layer, ids, w: F.embedding(ids, w)),
}


@pytest.fixture(params=list(LAYERS), ids=list(LAYERS))
def family(request):
    return LAYERS[request.param]


def test_a_new_layer_computes_exactly_its_base(family):
    build, make_input, reference = family
    torch.manual_seed(0)
    layer, x = build(), make_input()
    torch.testing.assert_close(layer(x), reference(layer, x, layer.weight), rtol=0, atol=0)


def test_forward_equals_the_dense_update_in_float64(family):
    build, make_input, reference = family
    torch.manual_seed(0)
    layer, x = build(), make_input()
    randomize_adapters(layer)
    torch.testing.assert_close(layer(x), reference(layer, x, dense_weight(layer)), rtol=1e-12, atol=1e-12)


def test_drop_in_layer_freezes_the_weight_and_trains_a_and_b(family):
    build, _, _ = family
    layer = build()
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert "weight" not in trainable
    assert {"lora.default.lora_A", "lora.default.lora_B"} <= trainable


@pytest.mark.parametrize(
    "layer, expected",
    [
        (lorakit.Linear(12, 6, r=4), 4 * (12 + 6)),
        (lorakit.Conv2d(3, 5, 3, r=2), 2 * 3 * 3 * 3 + 5 * 2),
        (lorakit.Conv1d(4, 6, 5, r=3), 3 * 4 * 5 + 6 * 3),
        (lorakit.Embedding(20, 6, r=3), 3 * (20 + 6)),
    ],
)
def test_adapter_parameter_count_is_r_times_in_plus_out(layer, expected):
    assert sum(p.numel() for p in layer.lora.parameters()) == expected


def test_dropout_applies_in_training_only():
    torch.manual_seed(0)
    layer = lorakit.Linear(16, 16, r=4, dropout=0.5)
    randomize_adapters(layer)
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_embedding_adapters_start_a_zero_and_b_normal():
    layer = lorakit.Embedding(20, 6, r=3)
    assert torch.count_nonzero(layer.lora["default"].lora_A) == 0
    assert torch.count_nonzero(layer.lora["default"].lora_B) > 0


def test_half_precision_base_keeps_float32_adapters_and_its_own_output_dtype():
    torch.manual_seed(0)
    layer = lorakit.Linear(8, 8, r=2, dtype=torch.bfloat16)
    randomize_adapters(layer)
    assert layer.lora["default"].lora_A.dtype == torch.float32
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    reference = F.linear(x.float(), dense_weight(layer).float(), layer.bias.float())
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("channels", "groups", "kwargs"), [
    (8, 2, {"padding": 1}),  # grouped
    (6, 6, {"padding": 1, "stride": 2}),  # depthwise, as in MobileNet
    (6, 6, {"padding": 2, "dilation": 2, "padding_mode": "reflect"}),
])
def test_a_grouped_convolution_adds_a_low_rank_update_of_its_kernel_and_merges_exactly(channels, groups, kwargs):
    """The update is B @ A with A (r, in / groups, k, k): the kernel seen as an (out, in / groups * 9)
    matrix plus a rank-r matrix. Forward equals the base convolution with the updated kernel, and
    merging gives that kernel."""
    torch.manual_seed(0)
    layer = lorakit.Conv2d(channels, channels, 3, groups=groups, r=2, alpha=4, **kwargs)
    randomize_adapters(layer)
    adapter = layer.lora["default"]
    assert adapter.lora_A.shape == (2, channels // groups, 3, 3) and adapter.lora_B.shape == (channels, 2, 1, 1)
    x = torch.randn(2, channels, 9, 9, requires_grad=True)
    y = layer(x)
    kernel = layer.weight + 2 * (adapter.lora_B.flatten(1) @ adapter.lora_A.flatten(1)).view(layer.weight.shape)
    torch.testing.assert_close(y, layer._conv_forward(x, kernel, layer.bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert adapter.lora_A.grad.abs().sum() > 0 and adapter.lora_B.grad.abs().sum() > 0
    with torch.no_grad():
        lorakit.merge(layer)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.weight, kernel, rtol=1e-6, atol=1e-6)


def test_layers_stay_instances_of_their_torch_type():
    assert isinstance(lorakit.Linear(2, 2), nn.Linear)
    assert isinstance(lorakit.Conv2d(2, 2, 1), nn.Conv2d)
    assert isinstance(lorakit.Embedding(4, 2), nn.Embedding)
