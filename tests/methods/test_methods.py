"""The methods beside LoRA (full fine-tuning, IA³, prompt tuning, prefix tuning, bottleneck adapters):
each trains through `lorakit train` and lowers the loss, saves and loads back to the same outputs, reads
and writes PEFT's files where PEFT has the method, and generates as its teacher-forced forward says."""

import json
import warnings
from dataclasses import replace

import pytest
import torch
from peft import (
    IA3Config,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.generation.generate import generate_ids
from lorakit.methods.ia3 import merge_ia3
from lorakit.methods.method import (
    MethodSettings,
    method_named,
    method_of_directory,
    methods_disabled,
)
from lorakit.models.base import load_for_inference
from lorakit.train.checkpoint import latest_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from tasks import orders
from tests.conftest import as_peft_writes_it, tiny_llama

METHODS = ["full", "ia3", "prompt", "prefix", "adapter"]
# Larger steps than the methods' defaults (chosen for real models): the tiny random model starts far off.
LEARNING_RATES = {"full": 1e-2, "ia3": 1e-1, "prompt": 3e-1, "prefix": 3e-1, "adapter": 3e-2}
SETTINGS = MethodSettings(num_virtual_tokens=4, adapter_size=8, adapter_placement="both")
PEFT_CONFIGS = {"ia3": lambda: IA3Config(task_type="CAUSAL_LM"),
                "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                "prefix-projection": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                prefix_projection=True, encoder_hidden_size=16)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("orders")
    orders.write_splits(directory, {"train": 24, "val": 6})
    return directory


def _config(tiny_base_dir, data_dir, output, method, **changes):
    settings = {"base": str(tiny_base_dir), "train": str(data_dir / "train.jsonl"), "val": str(data_dir / "val.jsonl"),
                "output": str(output), "method": method, "num_virtual_tokens": 4, "adapter_size": 8,
                "max_steps": 12, "batch_size": 4, "warmup_steps": 2, "eval_every": 0, "save_every": 0,
                "progress": False}
    return TrainConfig(**{**settings, **changes})


def _inputs():
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


def _trained(method: str, seed: int = 1, projection: int = 0):
    """A tiny Llama with ``method`` attached and its trained tensors moved off their start."""
    torch.manual_seed(seed)
    model = method_named(method).attach(tiny_llama().eval(), replace(SETTINGS, prefix_projection=projection))
    with torch.no_grad():
        for param in method_named(method).slots(model).values():
            param.add_(0.3 * torch.randn_like(param))
    return model


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_the_loss_and_its_files_load_for_inference(method, tiny_base_dir, data_dir, tmp_path,
                                                                     capsys):
    result = train(_config(tiny_base_dir, data_dir, tmp_path, method, max_steps=30, lr=LEARNING_RATES[method]))
    # Batches differ by a few tenths of a nat, so five steps are averaged at each end; a random 2-layer model
    # with a 49k vocabulary moves slowly for the methods with few parameters, hence 5% and not more.
    assert sum(result.losses[-5:]) < 0.95 * sum(result.losses[:5]), result.losses
    base = None if method == "full" else str(tiny_base_dir)
    model, tokenizer = load_for_inference(base, tmp_path)
    assert method_of_directory(tmp_path).name == method
    ids = tokenizer("two pizzas to 5 Elm Street", return_tensors="pt").input_ids
    plain, _ = load_for_inference(str(tiny_base_dir), None)
    assert not torch.equal(_logits(model, ids, torch.ones_like(ids)), _logits(plain, ids, torch.ones_like(ids)))
    from lorakit.cli import main

    command = ["eval", "--adapter", str(tmp_path), "--data", str(data_dir / "val.jsonl"), "--limit", "2"]
    assert main(command + ([] if method == "full" else ["--base", str(tiny_base_dir)])) == 0
    printed = capsys.readouterr().out
    assert ("base model" in printed) == (method != "full")  # a whole model has no base inside to compare with


@pytest.mark.parametrize("method", ["ia3", "prompt", "prefix", "adapter"])
def test_save_then_load_gives_identical_outputs_and_disabling_gives_the_base(method, tmp_path):
    ids, mask = _inputs()
    model = _trained(method)
    method_named(method).save(model, tmp_path)
    torch.manual_seed(1)
    loaded = method_named(method).load(tiny_llama().eval(), tmp_path)
    assert torch.equal(_logits(loaded, ids, mask), _logits(model, ids, mask))
    torch.manual_seed(1)
    base = tiny_llama().eval()
    with methods_disabled(loaded):
        assert torch.equal(_logits(loaded, ids, mask), _logits(base, ids, mask))
    assert not torch.allclose(_logits(loaded, ids, mask), _logits(base, ids, mask))


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_peft_reads_our_files_and_we_read_peft_s_with_the_same_outputs(kind, tmp_path):
    ids, mask = _inputs()
    method = kind.split("-")[0]
    virtual = 4 if method == "prompt" else 0  # PEFT's prompt tuning returns logits for the virtual tokens too
    warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)  # PEFT 0.21's prefix path
    torch.manual_seed(1)
    peft = get_peft_model(tiny_llama().eval(), PEFT_CONFIGS[kind]()).eval()
    with torch.no_grad():
        for param in peft.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    peft.save_pretrained(tmp_path / "peft")
    torch.manual_seed(1)
    ours = method_of_directory(tmp_path / "peft").load(tiny_llama().eval(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours, ids, mask), _logits(peft, ids, mask)[:, virtual:], rtol=0, atol=1e-6)

    mine = _trained(method, seed=2, projection=16 if kind == "prefix-projection" else 0)
    method_named(method).save(mine, tmp_path / "ours")
    torch.manual_seed(2)
    theirs = PeftModel.from_pretrained(tiny_llama().eval(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, ids, mask)[:, virtual:], _logits(mine, ids, mask), rtol=0, atol=1e-6)


def test_ia3_merged_equals_unmerged_and_leaves_a_plain_model():
    ids, mask = _inputs()
    model = _trained("ia3").double()
    unmerged = _logits(model, ids, mask)
    merged = merge_ia3(model)
    assert not any("ia3" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids, mask), unmerged, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generation_with_virtual_tokens_follows_the_teacher_forced_forward(method):
    """Greedy decoding through transformers' generate (left-padded prompts, a key/value cache that starts
    with the virtual tokens) emits at every step the argmax of a fresh forward over prompt + answer so far."""
    model = _trained(method, seed=3)
    model.generation_config.pad_token_id = 0
    prompts = [[5, 9, 14, 20, 33, 41], [7, 8, 60]]

    class Tokenizer:  # what generate_ids needs of a tokenizer
        pad_token_id, eos_token_id = 0, 2

    answers = generate_ids(model, Tokenizer(), prompts, max_new_tokens=6, batch_size=2)
    assert any(answers)
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = torch.tensor([prompt + answer])
        predicted = _logits(model, ids, torch.ones_like(ids)).argmax(-1)[0, len(prompt) - 1:-1]
        assert predicted.tolist() == answer


@pytest.mark.parametrize("projection", [0, 16])
def test_resume_is_exact_for_a_method_beside_lora(tiny_base_dir, data_dir, tmp_path, projection):
    """Prefix tuning, directly and through PEFT's MLP (whose weights the file does not hold: the
    checkpoint keeps them beside it)."""
    def config(name):
        return _config(tiny_base_dir, data_dir, tmp_path / name, "prefix", max_steps=6, prefix_projection=projection)

    whole = train(config("whole"))
    stopped = train(config("split"), stop_after=3)
    assert latest_checkpoint(tmp_path / "split").step == 3
    resumed = train(config("split"), resume=True)
    assert stopped.losses + resumed.losses == whole.losses
    assert (latest_checkpoint(tmp_path / "split").directory / "trainable.safetensors").is_file() == bool(projection)


def test_settings_that_only_lora_has_are_refused_for_other_methods(tiny_base_dir, data_dir, tmp_path):
    for method, changes in (("prompt", {"quant_bits": 4}), ("ia3", {"parallel": "fsdp"}), ("dora", {}),
                            ("adapter", {"adapter_placement": "middle"}), ("prompt", {"num_virtual_tokens": 0}),
                            ("prefix", {"gradient_checkpointing": True}), ("ia3", {"prefix_projection": 8})):
        with pytest.raises(ConfigError):
            _config(tiny_base_dir, data_dir, tmp_path, method, **changes)
    assert _config(tiny_base_dir, data_dir, tmp_path, "prompt").learning_rate == 3e-2
    assert _config(tiny_base_dir, data_dir, tmp_path, "prompt", lr=1e-3).learning_rate == 1e-3


def test_a_file_for_another_model_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    method_named("ia3").save(_trained("ia3"), tmp_path / "ia3")
    config = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(AdapterFileError, match="do not fit this model"):
        method_named("ia3").load(wider, tmp_path / "ia3")
    assert wider.state_dict().keys() == before.keys() and config["peft_type"] == "IA3"
    as_peft_writes_it(tmp_path / "ia3")  # no settings digest: the config alone is checked
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": 7}))
    with pytest.raises(AdapterFileError, match="target_modules"):
        method_named("ia3").load(tiny_llama(), tmp_path / "ia3")
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(AdapterFileError, match="LOHA"):
        method_of_directory(tmp_path / "ia3")


def test_lorakit_merge_folds_ia3_into_the_base_and_refuses_what_cannot_merge(tiny_base_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from lorakit.cli import main

    for method in ("ia3", "prompt"):
        model = method_named(method).attach(LlamaForCausalLM.from_pretrained(tiny_base_dir).eval(), SETTINGS)
        with torch.no_grad():
            for param in method_named(method).slots(model).values():
                param.add_(0.3 * torch.randn_like(param))
        method_named(method).save(model, tmp_path / method)
    ids, mask = _inputs()
    unmerged, _ = load_for_inference(str(tiny_base_dir), tmp_path / "ia3")
    assert main(["merge", "--base", str(tiny_base_dir), "--adapter", str(tmp_path / "ia3"),
                 "--output", str(tmp_path / "merged")]) == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()  # a plain transformers model
    torch.testing.assert_close(_logits(merged, ids, mask), _logits(unmerged, ids, mask), rtol=1e-5, atol=1e-5)
    assert main(["merge", "--base", str(tiny_base_dir), "--adapter", str(tmp_path / "prompt"),
                 "--output", str(tmp_path / "nothing")]) == 2
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("method", ["ia3", "prefix", "adapter"])
def test_the_server_refuses_other_kinds_at_registration_and_says_why(method, tiny_base_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from lorakit.serve.registry import AdapterRegistry

    model = method_named(method).attach(LlamaForCausalLM.from_pretrained(tiny_base_dir).eval(), SETTINGS)
    method_named(method).save(model, tmp_path / method)
    registry = AdapterRegistry(LlamaForCausalLM.from_pretrained(tiny_base_dir).eval())
    with pytest.raises(AdapterFileError, match="LoRA adapters only"):
        registry.register("x", tmp_path / method)
    assert "x" not in registry
