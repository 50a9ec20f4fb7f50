"""The engine: requests on different adapters, decoded together, give what each gives alone."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import lorakit
from lorakit.serve.engine import Engine, QueueFull, Request
from lorakit.serve.sampling import SamplingParams
from tests.conftest import randomize_adapters

ADAPTERS = [f"tenant{i}" for i in range(8)]


@pytest.fixture(scope="module")
def served(tiny_base_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    for i, name in enumerate(ADAPTERS):  # ranks 2, 4, 8, 16, 2, ...: mixed ranks in one batch
        r = 2 ** (1 + i % 4)
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=r, target_modules="all-linear"), name=name)
    randomize_adapters(model, std=0.3)
    return model, tokenizer


def _prompts(tokenizer, n):
    texts = ["two pizzas", "a coffee to 5 Elm Street please", "hi", "one large tea and nothing else",
             "three bagels", "a dozen donuts for pickup at noon", "soup", "four wraps, medium, to 9 Hill Lane"]
    return [tokenizer(t)["input_ids"] for t in texts[:n]]


def _alone(model, prompt, adapter, max_tokens):
    """Greedy decoding by transformers' own generate(), with only this adapter active."""
    if adapter is None:
        with lorakit.disable_adapters(model):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=2)
    else:
        lorakit.set_adapter(model, adapter)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=2)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(2)] if 2 in new else new


def test_eight_requests_on_eight_adapters_give_each_ones_greedy_tokens(served):
    model, tokenizer = served
    prompts = _prompts(tokenizer, 8)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    together = Engine(model, tokenizer).generate(prompts, ADAPTERS, greedy)
    alone = [_alone(model, p, a, 12) for p, a in zip(prompts, ADAPTERS, strict=True)]
    assert together == alone
    base = [_alone(model, p, None, 12) for p in prompts]
    assert sum(a != b for a, b in zip(alone, base, strict=True)) >= 6  # the adapters do change the answers


def test_requests_joining_a_running_batch_and_the_base_model_mix(served):
    model, tokenizer = served
    prompts = _prompts(tokenizer, 8)
    adapters = ["tenant3", None, "tenant3", "tenant1", None, "tenant5", "tenant1", "tenant0"]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    engine = Engine(model, tokenizer, max_batch=5)  # three must wait for a free row
    requests = [engine.submit(Request(a, p, greedy)) for p, a in zip(prompts[:4], adapters[:4], strict=True)]
    for _ in range(3):
        engine.step()
    requests += [engine.submit(Request(a, p, greedy)) for p, a in zip(prompts[4:], adapters[4:], strict=True)]
    while any(r.finish_reason is None for r in requests):
        engine.step()
    assert [r.ids for r in requests] == [_alone(model, p, a, 10) for p, a in zip(prompts, adapters, strict=True)]


def test_a_seed_gives_the_same_sample_alone_and_in_a_batch(served):
    model, tokenizer = served
    prompts = _prompts(tokenizer, 4)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    alone = Engine(model, tokenizer).generate(prompts[1:2], ["tenant2"], sampled)
    together = Engine(model, tokenizer).generate(prompts, ["tenant0", "tenant2", "tenant2", None], sampled)
    assert together[1] == alone[0]


def test_stop_strings_and_max_tokens_end_a_request(served):
    model, tokenizer = served
    prompt = _prompts(tokenizer, 1)[0]
    engine = Engine(model, tokenizer)
    full = engine.submit(Request("tenant1", prompt, SamplingParams(max_tokens=12, temperature=0)))
    while full.finish_reason is None:
        engine.step()
    events = []
    while not full.events.empty():
        events.append(full.events.get())
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 12
    assert text == tokenizer.decode(full.ids, skip_special_tokens=True)

    stop = text[len(text) // 2:len(text) // 2 + 2]  # a stop string from the middle of the answer
    cut = engine.submit(Request("tenant1", prompt, SamplingParams(max_tokens=12, temperature=0, stop=(stop,))))
    while cut.finish_reason is None:
        engine.step()
    streamed = ""
    while not cut.events.empty():
        streamed += cut.events.get().text
    assert cut.finish_reason == "stop" and streamed == text[:text.index(stop)]


def test_a_full_queue_refuses_instead_of_piling_up(served):
    model, tokenizer = served
    engine = Engine(model, tokenizer, max_waiting=2)
    params = SamplingParams(max_tokens=2)
    engine.submit(Request(None, [5, 6], params))
    engine.submit(Request(None, [5, 6], params))
    with pytest.raises(QueueFull):
        engine.submit(Request(None, [5, 6], params))


def _out_of_memory(*args, **kwargs):
    raise RuntimeError("out of memory")


def test_a_failing_batch_fails_its_requests_and_the_engine_keeps_serving(served, monkeypatch):
    model, tokenizer = served
    engine = Engine(model, tokenizer)
    engine.start()
    try:
        params = SamplingParams(max_tokens=3, temperature=0)
        with monkeypatch.context() as patch:
            patch.setattr(model, "forward", _out_of_memory)
            doomed = engine.submit(Request("tenant1", [5, 6, 7], params))
            event = doomed.events.get(timeout=30)
        assert event.finish_reason == "error" and "out of memory" in event.text
        fine = engine.submit(Request("tenant1", [5, 6, 7], params))
        while fine.finish_reason is None:
            fine.events.get(timeout=30)
        assert fine.finish_reason == "length" and len(fine.ids) == 3
    finally:
        engine.stop()


def test_a_row_that_goes_wrong_fails_its_own_request_and_the_batch_goes_on(served, monkeypatch):
    """A fault in one row of a mixed batch (an adapter whose weights turn NaN after it was loaded, and
    a request whose sampling raises) fails those requests; every other row decodes what it would alone."""
    from lorakit.serve import engine as engine_module

    model, tokenizer = served
    prompts = _prompts(tokenizer, 6)
    adapters = ["tenant0", "tenant1", "tenant2", "tenant1", None, "tenant3"]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    alone = [_alone(model, p, a, 8) for p, a in zip(prompts, adapters, strict=True)]
    poisoned = model.model.layers[0].self_attn.q_proj.lora["tenant2"].lora_B
    saved = poisoned.detach().clone()
    failing = SamplingParams(max_tokens=8, temperature=0, seed=13)  # this one's sampling will raise
    real_next_token = engine_module.next_token

    def next_token(logits, params, generator):
        if params is failing:
            raise RuntimeError("sampling failed")
        return real_next_token(logits, params, generator)

    monkeypatch.setattr(engine_module, "next_token", next_token)
    try:
        with torch.no_grad():
            poisoned.fill_(float("nan"))
        engine = Engine(model, tokenizer)
        requests = [engine.submit(Request(a, p, failing if i == 3 else greedy))
                    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]
        while not all(r.finish_reason for r in requests):
            engine.step()
    finally:
        with torch.no_grad():
            poisoned.copy_(saved)
    assert requests[2].finish_reason == "error" and "NaN or infinite logits" in requests[2].error
    assert requests[3].finish_reason == "error" and "sampling failed" in requests[3].error
    for i in (0, 1, 4, 5):
        assert requests[i].finish_reason in ("stop", "length") and requests[i].ids == alone[i]
    assert engine.busy == 0  # the failed rows left the batch


def test_requests_joining_and_leaving_at_random_steps_each_get_their_greedy_tokens(served):
    """Churn: 40 requests of 2 to 9 tokens on random adapters (and the base model) join a batch of 5
    between random steps, so rows are selected, padded, trimmed and extended in every order while
    the cache grows in place."""
    import random

    model, tokenizer = served
    prompts = _prompts(tokenizer, 8)
    rng = random.Random(0)
    jobs = [(rng.choice(prompts), rng.choice([*ADAPTERS, None]), rng.randint(2, 9)) for _ in range(40)]
    engine = Engine(model, tokenizer, max_batch=5)
    requests, waiting = [], list(jobs)
    while waiting or any(r.finish_reason is None for r in requests):
        for _ in range(rng.randint(0, 3)):
            if waiting:
                prompt, adapter, n = waiting.pop(0)
                requests.append(engine.submit(Request(adapter, prompt, SamplingParams(max_tokens=n, temperature=0))))
        engine.step()
    for (prompt, adapter, n), request in zip(jobs, requests, strict=True):
        assert request.ids == _alone(model, prompt, adapter, n), (adapter, n)


def test_a_dora_adapter_decodes_beside_plain_ones_and_the_registry_takes_its_file(tiny_base_dir, tmp_path):
    from lorakit.core.walk import lora_layers
    from lorakit.serve.registry import AdapterRegistry

    model = LlamaForCausalLM.from_pretrained(tiny_base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=4, target_modules="all-linear", use_dora=True), name="dora")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, target_modules="all-linear"), name="plain")
    randomize_adapters(model, std=0.3)
    for _, layer in lora_layers(model):
        layer.lora["dora"].magnitude.data.mul_(1.3)
    prompts = _prompts(tokenizer, 4)
    adapters = ["dora", "plain", None, "dora"]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    together = Engine(model, tokenizer).generate(prompts, adapters, greedy)
    assert together == [_alone(model, p, a, 10) for p, a in zip(prompts, adapters, strict=True)]

    lorakit.save_adapter(model, tmp_path / "dora", name="dora")
    registry = AdapterRegistry(LlamaForCausalLM.from_pretrained(tiny_base_dir).eval())
    registry.register("d", tmp_path / "dora")
    registry.acquire("d")
    assert registry.info("d").loaded and lorakit.get_adapter_config(registry.model, "d").use_dora


def test_a_bfloat16_model_serves_mixed_adapters_as_each_alone(tiny_base_dir):
    """`lorakit serve --dtype bfloat16`: base weights and cache in bfloat16, adapters kept in float32 and
    applied in the base's dtype, rows on different adapters still each get their own greedy tokens."""
    model = LlamaForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=4, target_modules="all-linear"), name=name)
    randomize_adapters(model, std=0.3)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora["a"].lora_A.dtype == torch.float32
    prompts = _prompts(tokenizer, 4)
    adapters = ["a", None, "b", "a"]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    together = Engine(model, tokenizer).generate(prompts, adapters, greedy)
    assert together == [_alone(model, p, a, 10) for p, a in zip(prompts, adapters, strict=True)]


def test_json_object_requests_are_constrained_and_the_others_in_their_batch_are_not(served):
    from tests.generation.test_json_constraint import _follows_constraint

    model, tokenizer = served
    prompts = _prompts(tokenizer, 4)
    engine = Engine(model, tokenizer)
    json_params = SamplingParams(max_tokens=12, temperature=0, json_object=True)
    sampled_json = SamplingParams(max_tokens=12, temperature=0.9, seed=3, json_object=True)
    plain = SamplingParams(max_tokens=12, temperature=0)
    requests = [engine.submit(Request(a, p, params)) for p, a, params in zip(
        prompts, ["tenant0", "tenant1", "tenant0", None], [json_params, sampled_json, plain, json_params], strict=True)]
    while any(r.finish_reason is None for r in requests):
        engine.step()
    assert [_follows_constraint(tokenizer, r.ids) for r in requests] == [True, True, False, True]
    assert requests[2].ids == _alone(model, prompts[2], "tenant0", 12)  # the unconstrained row is untouched


def test_the_engine_packs_float32_weights_while_it_runs_and_decodes_the_same_tokens(tiny_base_dir):
    from lorakit.commands.serve import _packed_note
    from lorakit.models.packed_weights import packing_available

    if not packing_available():
        pytest.skip("this PyTorch build has no oneDNN")
    model = LlamaForCausalLM.from_pretrained(tiny_base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    for name in ADAPTERS[:2]:
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=4, target_modules="all-linear"), name=name)
    randomize_adapters(model, std=0.3)
    prompts, adapters = _prompts(tokenizer, 4), [ADAPTERS[0], ADAPTERS[0], ADAPTERS[1], None]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    plain = Engine(model, tokenizer, packed_weights=False)
    expected = plain.generate(prompts, adapters, greedy)
    assert _packed_note(plain) == ""

    engine = Engine(model, tokenizer)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert engine.packed.nbytes == sum(m.weight.numel() * 4 for m in linears)
    assert "MiB packed for oneDNN" in _packed_note(engine)
    assert engine.generate(prompts, adapters, greedy) == expected
    engine.stop()
    assert engine.packed.nbytes == 0 and not any("forward" in vars(m) for m in model.modules())
