"""End to end on the real embedded SmolLM2-135M-Instruct: `lorakit train` with the demo recipe for a
few steps, then the adapter scored against the base model on held-out examples."""

import json

from lorakit.cli import main
from lorakit.evaluation.evaluate import compare_base_and_adapter
from lorakit.models.base import load_for_inference


def test_a_few_steps_on_the_real_model_lower_the_loss_on_unseen_examples(tmp_path, capsys):
    out = tmp_path / "orders"
    assert main(["train", "--config", "configs/smollm2-orders.yaml", "--output", str(out), "--max-steps", "4",
                 "--batch-size", "4", "--warmup-steps", "0", "--val", "", "--no-progress"]) == 0
    assert "adapter written to" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["r"] == 16 and len(config["target_modules"]) == 30 * 7  # every linear layer, by name

    model, tokenizer = load_for_inference("smollm2", out)
    _, (base, adapter), _ = compare_base_and_adapter(model, tokenizer, "data/orders/test.jsonl", limit=8,
                                                     batch_size=8, examples=0)
    assert adapter.loss < 0.5 * base.loss, (base.loss, adapter.loss)  # four steps already teach the format
