"""lorakit in one page: inject, train only the adapter, save it, load it back, merge it.

Runs on a CPU in seconds on a small random Llama (the same code works on any transformers
model). Run it with `.venv/bin/python examples/quickstart.py`.
"""

import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same random "pre-trained" weights every time
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def main() -> None:
    model = lorakit.inject(base_model(), lorakit.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="all-linear"))
    lorakit.mark_only_lora_as_trainable(model, bias="none")
    trainable = sum(p.numel() for p in lorakit.lora_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    print(f"adapted {len(list(lorakit.core.walk.lora_layers(model)))} linear layers: "
          f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    # The task: memorise one 32-token sequence. The frozen random base cannot; the adapter learns it.
    sequence = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(lorakit.lora_parameters(model), lr=1e-2)
    model.train()
    start = time.perf_counter()
    for step in range(60):
        loss = model(sequence, labels=sequence).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 15 == 0 or step == 59:
            print(f"step {step:2d}  loss {loss.item():.3f}")
    print(f"trained in {time.perf_counter() - start:.1f}s")
    model.eval()

    with tempfile.TemporaryDirectory() as directory:
        lorakit.save_adapter(model, directory)
        size = sum(f.stat().st_size for f in Path(directory).iterdir())
        print(f"saved the adapter: {size / 1e6:.2f} MB ({', '.join(sorted(p.name for p in Path(directory).iterdir()))})")
        reloaded = lorakit.load_adapter(base_model(), directory).eval()
    with torch.no_grad():
        logits = model(sequence).logits
        same = torch.equal(reloaded(sequence).logits, logits)
        predicted = logits[0, :-1].argmax(-1)
        accuracy = (predicted == sequence[0, 1:]).float().mean().item()
        with lorakit.disable_adapters(model):
            base_accuracy = (model(sequence).logits[0, :-1].argmax(-1) == sequence[0, 1:]).float().mean().item()
        plain = lorakit.merge_and_unload(model)
        merged_diff = (plain(sequence).logits - logits).abs().max().item()
    print(f"next-token accuracy: base {base_accuracy:.0%}, with adapter {accuracy:.0%}")
    print(f"reloaded adapter gives identical logits: {same}")
    print(f"merged model (plain {type(plain.model.layers[0].self_attn.q_proj).__name__} layers) "
          f"differs by at most {merged_diff:.1e}")


if __name__ == "__main__":
    main()
