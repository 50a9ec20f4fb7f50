"""`lorakit compare` on the tiny model: one table over every method named, a chart, and a rerun that
scores again without training again."""

import json

import lorakit
from lorakit.cli import main
from tests.conftest import write_orders_recipe


def test_compare_trains_each_method_scores_it_and_resumes(tiny_base_dir, tmp_path, capsys):
    recipe = write_orders_recipe(tmp_path, tiny_base_dir, "recipe.yaml", eval_every=0, save_every=0)
    output = tmp_path / "compare"
    argv = ["compare", "--config", str(recipe), "--methods", "lora,ia3,prompt,full", "--test",
            str(tmp_path / "val.jsonl"), "--max-steps", "2", "--output", str(output), "--no-progress"]
    assert main(argv) == 0
    table = (output / "compare.md").read_text()
    assert table in capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| LoRA", "| IA³", "| prompt tuning", "| full fine-tuning"]
    assert "cannot merge" in rows[2] and "is the model" in rows[3]
    assert (output / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = {m: json.loads((output / m / "compare.json").read_text()) for m in ("lora", "ia3", "prompt", "full")}
    assert results["ia3"]["trainable"] < results["lora"]["trainable"] < results["full"]["trainable"]
    assert results["full"]["stored_bytes"] > 10 * results["lora"]["stored_bytes"]
    assert all(r["peak_bytes"] > 0 and r["steps"] == 2 and r["examples"] == 4 for r in results.values())
    assert results["ia3"]["merged_latency"] is not None and results["prompt"]["merged_latency"] is None

    written = (output / "lora" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0  # everything trained: nothing is trained again, only scored
    assert (output / "lora" / "adapter_model.safetensors").stat().st_mtime_ns == written
    assert (output / "compare.md").read_text().count("| LoRA |") == 1


def test_a_time_budget_gives_each_method_the_steps_that_fit_in_it(tiny_base_dir, tmp_path, capsys):
    recipe = write_orders_recipe(tmp_path, tiny_base_dir, "recipe.yaml", eval_every=0, save_every=0)
    output = tmp_path / "compare"
    assert main(["compare", "--config", str(recipe), "--methods", "ia3,adapter", "--test", str(tmp_path / "val.jsonl"),
                 "--budget-min", "0.02", "--limit", "2", "--output", str(output), "--no-progress"]) == 0
    for method in ("ia3", "adapter"):
        result = json.loads((output / method / "compare.json").read_text())
        # 1.2 s of steps: how many depends on the machine, but each is its own method's count
        training = json.loads((output / method / "trained.json").read_text())
        assert training["budget"]["budget_min"] == 0.02 and result["steps"] == training["steps"] >= 1
        assert result["steps"] == len([line for line in (output / method / "metrics.jsonl").read_text().splitlines()
                                       if '"loss"' in line])
        assert not (output / f".{method}-calibration").exists()
    assert "0.02 minutes of training steps" in capsys.readouterr().out
    assert main(["compare", "--config", str(recipe), "--budget-min", "1", "--max-steps", "3"]) == 2


def test_loras_variants_compare_as_methods_of_their_own(tiny_base_dir, tmp_path, capsys):
    recipe = write_orders_recipe(tmp_path, tiny_base_dir, "recipe.yaml", eval_every=0, save_every=0,
                                 copy_fields="[item, deliver_to]")
    output = tmp_path / "compare"
    assert main(["compare", "--config", str(recipe), "--methods", "dora,pissa", "--test",
                 str(tmp_path / "val.jsonl"), "--max-steps", "2", "--limit", "2", "--output", str(output),
                 "--no-progress"]) == 0
    rows = [line for line in (output / "compare.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| DoRA", "| PiSSA"]
    # the recipe's copy fields: every method trains on copy-aligned targets and is scored copying them
    assert "answers copy deliver_to, item from the message" in (output / "compare.md").read_text()
    assert all((output / m / "decoding.json").is_file() for m in ("dora", "pissa"))
    results = {m: json.loads((output / m / "compare.json").read_text()) for m in ("dora", "pissa")}
    assert results["dora"]["trainable"] > results["pissa"]["trainable"]  # LoRA's A and B, and DoRA's m
    assert lorakit.read_adapter_config(output / "dora").use_dora
    recipe_r = lorakit.read_adapter_config(output / "dora").r
    assert lorakit.read_adapter_config(output / "pissa").r == 2 * recipe_r  # saved for the untouched base
    assert all(r["merged_latency"] is not None and r["servable"] for r in results.values())
    assert main(["compare", "--config", str(recipe), "--methods", "lora,qlora"]) == 2
    assert "rslora, dora, pissa, olora, loraplus" in capsys.readouterr().err
