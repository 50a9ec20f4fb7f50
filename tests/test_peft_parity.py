"""Parity with Hugging Face PEFT on the same weights, and adapter files read both ways.

Covers every layer family PEFT shares with lorakit: Linear, GPT-2 Conv1D, Conv2d, Conv1d and
Embedding, and a MobileNetV2's pointwise convolutions and classifier. (lorakit also honours a
conv's dilation and padding mode in A, which PEFT does not, so the CNN here uses neither; and its
LoRA on grouped convolutions differs from PEFT's, so the MobileNetV2 case leaves the depthwise
ones out.)
"""


import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import lorakit
from tests.conftest import (
    CASES,
    MLP,
    Case,
    EmbeddingModel,
    random_tokens,
    randomize_adapters,
    tiny_gpt2,
    tiny_llama,
)


class PlainCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.seq_conv = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.relu(self.seq_conv(h.flatten(2))).mean(-1))


def tiny_mobilenet_v2() -> nn.Module:
    from lorakit.models.mobilenet_v2 import MobileNetV2

    model = MobileNetV2(num_classes=10, width_mult=0.25, dropout=0.0)
    # Batch-norm statistics from one batch, as a trained model has its own: with the initial ones
    # (mean 0, variance 1) a random model's signal fades through the 17 blocks to ~1e-7.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(9)))
    nn.init.normal_(model.classifier[1].weight, std=0.3)
    return model


# Every expansion (conv.0.0 after the first block) and projection (conv.2) 1x1 convolution, and the head.
MOBILENET_POINTWISE = r"features\.([2-9]|1[0-7])\.conv\.(0\.0|2)|classifier\.1"

PARITY_CASES = [
    Case("linear", MLP, CASES[0].make_input, ["fc1", "fc2", "head"]),
    Case("gpt2_conv1d", tiny_gpt2, random_tokens, ["c_attn", "c_proj", "c_fc"]),
    Case("conv", PlainCNN, CASES[1].make_input, ["conv1", "conv2", "seq_conv"]),
    Case("embedding", EmbeddingModel, CASES[2].make_input, ["emb"]),
    Case("llama", tiny_llama, random_tokens, ["embed_tokens", "q_proj", "v_proj", "down_proj"]),
    Case("mobilenet_v2", tiny_mobilenet_v2, lambda g: torch.randn(2, 3, 32, 32, generator=g), MOBILENET_POINTWISE),
]


@pytest.fixture(params=PARITY_CASES, ids=[c.name for c in PARITY_CASES])
def pcase(request):
    return request.param


def test_lorakit_adapter_loads_in_peft_with_the_same_outputs_and_gradients(pcase, tmp_path):
    model = pcase.model()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=pcase.targets, use_rslora=True))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(pcase.model(), tmp_path, is_trainable=True)

    x = pcase.input()
    ours, theirs = pcase.run(model, x), pcase.run(peft_model, x)
    assert (ours - theirs).abs().max() < 1e-5
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    our_grads = {k: p.grad for k, p in lorakit.files.peft_format.adapter_slots(model, "default").items()}
    their_grads = {_peft_key(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys()
    for key, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_peft_adapter_loads_in_lorakit_with_the_same_outputs(pcase, tmp_path):
    torch.manual_seed(3)
    # init_lora_weights=False: PEFT draws A and B at random, so the adapter changes the output.
    patterns = {} if isinstance(pcase.targets, str) else {"rank_pattern": {pcase.targets[0]: 2},
                                                         "alpha_pattern": {pcase.targets[-1]: 3}}
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=pcase.targets, init_lora_weights=False, **patterns)
    peft_model = get_peft_model(pcase.model(), config)
    peft_model.save_pretrained(tmp_path)
    model = lorakit.load_adapter(pcase.model(), tmp_path)

    x = pcase.input()
    expected = pcase.run(peft_model, x)
    assert (pcase.run(model, x) - expected).abs().max() < 1e-5
    with peft_model.disable_adapter():
        assert (pcase.run(model, x) - pcase.run(peft_model, x)).abs().max() > 1e-4  # the adapter matters


def test_peft_and_lorakit_merge_to_the_same_weights(tmp_path):
    case = PARITY_CASES[4]
    model = case.model()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=case.targets))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(case.model(), tmp_path).merge_and_unload().state_dict()
    ours = lorakit.merge_and_unload(model).state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6, msg=key)


def test_peft_modules_to_save_and_bias_files_load_in_lorakit(tmp_path):
    torch.manual_seed(0)
    config = PeftLoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"], bias="lora_only",
                            init_lora_weights=False)
    peft_model = get_peft_model(MLP(), config)
    with torch.no_grad():
        peft_model.base_model.model.head.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = lorakit.load_adapter(MLP(), tmp_path)
    x = CASES[0].input()
    torch.testing.assert_close(model(x), peft_model(x), rtol=1e-5, atol=1e-6)


def _peft_key(name: str) -> str:
    """PEFT's in-memory parameter name -> its file key (drop the adapter name)."""
    return name.replace(".default", "")
