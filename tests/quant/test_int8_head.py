"""The output head multiplied from 8-bit codes where its float weight is exactly on an 8-bit block grid
(int8_head.py, int8_float32.c): which heads are taken, the product against float64, when it is not used."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.models.base import load_base
from lorakit.models.packed_weights import PackedLinearWeights, packing_available
from lorakit.models.quantized import QuantSpec, load_quantized, save_quantized
from lorakit.quant.int8_head import (
    HEAD_MAX_ROWS,
    Int8Grid,
    Int8GridHead,
    int8_grid,
    use_int8_grid_head,
)
from lorakit.quant.linear import use_int4_kernel
from tests.quant.buildable import needs_kernel


def _grid_weight(rows=200, cols=96, seed=0):
    """A weight as a GGUF Q8_0 block grid de-quantizes: float16 d times q in [-127, 127], 32 weights a block."""
    generator = torch.Generator().manual_seed(seed)
    d = (torch.rand(rows, cols // 32, 1, generator=generator) * 0.01 + 1e-4).half().float()
    q = torch.randint(-127, 128, (rows, cols // 32, 32), generator=generator).float()
    q[:, :, 0] = 127  # Q8_0 maps each block's largest |w| to 127 steps
    return (d * q).reshape(rows, cols)


def _head(weight, bias=None):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return Int8GridHead.of(linear)


def test_only_weights_exactly_on_the_grid_are_taken():
    weight = _grid_weight()
    codes, scales = int8_grid(weight)
    assert codes.dtype == torch.int8 and scales.shape == (200, 3)
    assert torch.equal(codes.float().view(200, 3, 32) * scales[..., None], weight.view(200, 3, 32))
    zero_block = weight.clone()
    zero_block[5, :32] = 0  # a block of zeros has scale 0
    assert int8_grid(zero_block) is not None
    nudged = weight.clone()
    nudged[7, 40] = torch.nextafter(nudged[7, 40], torch.tensor(1.0))  # one weight one float32 step off
    assert int8_grid(nudged) is None
    for bad in (float("nan"), float("inf")):
        hostile = weight.clone()
        hostile[3, 3] = bad
        assert int8_grid(hostile) is None
    assert int8_grid(torch.randn(200, 96)) is None  # a float weight not from such a file
    assert int8_grid(weight.half()) is None and int8_grid(weight[:, :80]) is None  # float16; width not 32k


@needs_kernel
@pytest.mark.parametrize("shape", [(96,), (1, 96), (1, 1, 96), (3, 96), (2, 5, 96), (HEAD_MAX_ROWS, 96)])
def test_the_head_multiplies_from_codes_as_the_float_head_would(shape):
    weight, bias = _grid_weight(), torch.randn(200)
    head = _head(weight, bias)
    x = torch.randn(shape)
    with torch.no_grad():
        y = head(x)
    assert isinstance(head._grid[1], Int8Grid)
    reference = F.linear(x.double(), weight.double(), bias.double())
    assert y.shape == reference.shape and y.dtype == torch.float32
    assert (y.double() - reference).norm() / reference.norm() < 1e-6  # float32 rounding, another order
    with torch.no_grad():
        assert not torch.equal(y, F.linear(x, weight, bias))  # the codes' product, not the float one


@needs_kernel
def test_the_float_product_is_kept_for_training_many_rows_and_a_changed_weight():
    weight = _grid_weight()
    head = _head(weight.clone())
    x = torch.randn(HEAD_MAX_ROWS + 1, 96)
    with torch.no_grad():
        assert torch.equal(head(x), F.linear(x, head.weight))  # past HEAD_MAX_ROWS: the float product
        assert head._grid[0] is None  # not even looked for
    head.weight.requires_grad_(True)
    y = head(x[:1])  # with autograd: the float product, and the weight's gradient
    assert torch.equal(y, F.linear(x[:1], head.weight))
    y.sum().backward()
    assert head.weight.grad is not None
    head.weight.requires_grad_(False)
    with torch.no_grad():
        head(x[:1])
        assert head._grid[1] is not None
        head.weight[0, 0] += 1e-3  # trained, edited: off the grid now
        assert torch.equal(head(x[:1]), F.linear(x[:1], head.weight)) and head._grid[1] is None
    on_grid = _head(weight)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be multiplied"):  # as nn.Linear's head fails
        on_grid(torch.randn(1, 95))
    with torch.no_grad():
        assert on_grid(torch.randn(0, 96)).shape == (0, 200)  # no rows: nothing to multiply
    with torch.inference_mode():
        made_in_inference_mode = _head(_grid_weight())
        assert torch.equal(made_in_inference_mode(x[:1]), F.linear(x[:1], made_in_inference_mode.weight))


@needs_kernel
def test_threads_do_not_change_the_result():
    head = _head(_grid_weight(rows=1000))
    x = torch.randn(5, 96)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = head(x)
            torch.set_num_threads(2)
            two = head(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_a_quantized_models_tied_head_takes_the_codes_and_survives_a_save(tmp_path, tiny_base_dir):
    model, tokenizer = load_base(tiny_base_dir, quant=QuantSpec(4, 32))
    embedding = model.get_input_embeddings()
    assert type(model.lm_head) is Int8GridHead and model.lm_head.weight is embedding.weight  # still tied
    with torch.no_grad():  # the tied embedding and head as a GGUF Q8_0 file holds them
        embedding.weight.copy_(_grid_weight(*embedding.weight.shape, seed=1))
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        grid_logits = model(ids).logits[:, -1]
        assert model.lm_head._grid[1] is not None
        float_logits = F.linear(model.model(ids).last_hidden_state[:, -1], embedding.weight)
    assert ((grid_logits - float_logits).norm() / float_logits.norm()) < 1e-6
    save_quantized(model, tokenizer, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    assert type(loaded.lm_head) is Int8GridHead and loaded.lm_head.weight is loaded.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits[:, -1], grid_logits)


def test_a_model_without_a_linear_head_is_left_as_it_is():
    model = nn.Sequential(nn.Linear(4, 4))
    assert use_int8_grid_head(model) is model and type(model[0]) is nn.Linear


@needs_kernel
def test_the_exact_path_switch_gives_the_float_head():
    head = _head(_grid_weight())
    x = torch.randn(2, 96)
    with torch.no_grad():
        assert not torch.equal(head(x), F.linear(x, head.weight))
        use_int4_kernel(nn.Sequential(head), False)
        assert torch.equal(head(x), F.linear(x, head.weight))


@needs_kernel
@pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN")
def test_only_a_head_that_multiplies_as_floats_gets_a_packed_float_copy():
    on_grid, off_grid, switched_off = _head(_grid_weight()), _head(torch.randn(200, 96)), _head(_grid_weight())
    switched_off.use_kernel = False  # as --exact-4bit leaves it
    packed = PackedLinearWeights(nn.ModuleList([on_grid, off_grid, switched_off]))
    assert "forward" not in vars(on_grid)  # its codes do the products: no 4-byte copy of its weight
    assert "forward" in vars(off_grid) and "forward" in vars(switched_off)
    assert packed.nbytes == 2 * 200 * 96 * 4
    x = torch.randn(3, 96)
    with torch.no_grad():
        for head in (off_grid, switched_off):
            torch.testing.assert_close(head(x), F.linear(x, head.weight))
