"""The generation engine: one base model, requests on different adapters decoded in one batch.

Iteration-level batching: between two decoding steps, finished requests leave the batch and waiting
ones join it (their prompts are run together first, then their key/value cache is stacked onto the
running batch's). Rows are kept grouped by adapter, so each adapter's rows are one segment
(lorakit.rows); the base layers run once for all rows, and decoding steps add every
segment's adapter with two batched matmuls per layer.

Each request has its own sampling settings and random generator, so its tokens do not depend on
which other requests share its batch (greedy decoding gives the tokens it gives alone). A row that
goes wrong (non-finite logits, a sampling error, an adapter that fails to load) fails its own
request; the rest of the batch goes on. Free rows go round-robin to the tenants with requests
waiting (serve/fair_queue.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.data.tokenize import padding_id
from lorakit.errors import ConfigError, LorakitError
from lorakit.generation.json_constraint import JsonObjectAnswer
from lorakit.generation.prompts import end_token_ids, left_padded
from lorakit.models.packed_weights import PackedLinearWeights
from lorakit.rows import RowPlan, row_segments, rows_use_plan
from lorakit.serve.fair_queue import FairQueue, QueueFull
from lorakit.serve.kv import BatchCache
from lorakit.serve.sampling import SamplingParams, next_token

__all__ = ["Engine", "Event", "QueueFull", "Request"]


class RowError(LorakitError):
    """One row of the batch went wrong; its request fails, the others go on."""


@dataclass(frozen=True)
class Event:
    """What a request's consumer receives: text as it is decided, then one final event."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "error" on the final event
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    adapter: str | None  # None: the base model alone
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str | None = None  # whose turn it takes in the waiting line
    # Where its events go, called on the engine's thread; by default the ``events`` queue.
    deliver: Callable[[Event], None] | None = None
    id: int = field(default_factory=count().__next__)
    events: queue.Queue = field(default_factory=queue.Queue)
    submitted: float = field(default_factory=time.monotonic)
    ids: list[int] = field(default_factory=list)  # generated so far
    sent: int = 0  # characters of the decoded text already sent
    finish_reason: str | None = None  # set once the request is done
    error: str = ""  # why, when finish_reason is "error"
    failure: Exception | None = None  # the exception behind ``error``
    generator: torch.Generator = field(init=False)
    # The grammar that keeps a params.json_object answer one JSON object (made by the engine if not given).
    json_answer: JsonObjectAnswer | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ConfigError("the prompt is empty; give at least one token")
        self.generator = torch.Generator()
        self.generator.manual_seed(self.params.seed if self.params.seed is not None else
                                   int(torch.randint(0, 2**62, ()).item()))


class Engine:
    """Drive it with ``step()`` (tests, scripts) or ``start()`` (a background thread, the server).

    ``prepare(adapter)`` is called for each request before it joins the batch (the registry loads
    its adapter there, if it was evicted), ``release(adapter)`` when it has left. Both run under
    ``lock``, which every step holds, so an adapter never changes while a batch uses it.
    ``packed_weights``: the base model's float32 Linear weights get a copy in oneDNN's layout while
    the engine runs (faster products on a CPU, the weights' memory again; models/packed_weights.py);
    ``stop()`` drops it.
    """

    def __init__(self, model: nn.Module, tokenizer, max_batch: int = 32, max_waiting: int = 256,
                 prepare: Callable[[str], None] = lambda name: None,
                 release: Callable[[str], None] = lambda name: None, packed_weights: bool = True) -> None:
        self.model = model.eval()
        # float32 Linear weights on a CPU, packed for oneDNN's faster products (models/packed_weights.py);
        # None with packed_weights=False; ``packed.nbytes`` is their extra memory.
        self.packed = PackedLinearWeights(model) if packed_weights else None
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.prepare, self.release = prepare, release
        self.eos_ids = end_token_ids(model, tokenizer)
        self.pad_id = padding_id(tokenizer)
        self.lock = threading.RLock()
        self._waiting: FairQueue[Request] = FairQueue(max_waiting)
        self._wake = threading.Event()
        self._running: list[Request] = []  # rows of the batch, grouped by adapter
        self._cache: BatchCache | None = None
        self._last: torch.Tensor | None = None  # (B,) each row's latest token: the next step's input
        self._plan: RowPlan | None = None  # the decoding steps' row plan
        self._rows_changed = False  # since the plan was made: it is remade, keeping what still fits
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- submitting ---------------------------------------------------------------------------

    @property
    def max_waiting(self) -> int:
        return self._waiting.max_waiting

    @max_waiting.setter
    def max_waiting(self, value: int) -> None:
        self._waiting.max_waiting = value

    def submit(self, request: Request, tenant_limit: int | None = None) -> Request:
        """Queue ``request``; QueueFull when the waiting line is full, or when its tenant already
        holds ``tenant_limit`` requests (running and waiting)."""
        self._waiting.put(request, tenant_limit)
        self._wake.set()
        return request

    def generate(self, prompts: list[list[int]], adapters: list[str | None], params: SamplingParams) -> list[list[int]]:
        """Token ids generated for each prompt on its adapter, all decoded together (no thread needed)."""
        requests = [self.submit(Request(a, p, params)) for p, a in zip(prompts, adapters, strict=True)]
        while not all(_finished(r) for r in requests):
            self.step()
        failed = [r for r in requests if r.finish_reason == "error"]
        if failed:
            raise ConfigError(f"request on adapter {failed[0].adapter!r} failed: {failed[0].error}")
        return [r.ids for r in requests]

    def cancel(self, request: Request) -> None:
        """End ``request`` now (its client went away, or its handler failed): a running row leaves
        the batch after the step under way, a waiting request never joins it. Thread-safe, and
        a no-op for a request that has already ended."""
        if request.finish_reason is None:
            request.finish_reason = "cancelled"
        self._wake.set()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> int:
        return self.running + self.waiting

    # --- the loop -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if self.packed is not None:
            self.packed.release()

    def _loop(self) -> None:
        while not self._stopping:
            if not self._running and not len(self._waiting):
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - fail the batch, not the server (out of memory, ...)
                self._fail_batch(err)

    def _fail_batch(self, err: Exception) -> None:
        """End every running request with ``err`` and start again from an empty batch."""
        with self.lock:
            for request in self._running:
                if not _finished(request):
                    _fail(request, err)
                self._leave(request)
            self._running, self._cache, self._last, self._plan = [], None, None, None

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, then decode one token for every running request."""
        with self.lock:
            joining = []
            while len(self._running) + len(joining) < self.max_batch:
                request = self._waiting.take()
                if request is None:
                    break
                if _finished(request):  # cancelled while it waited: it takes no row
                    self._waiting.done(request)
                    continue
                joining.append(request)
            if joining:
                self._admit(joining)
            if self._running:
                self._decode()

    def _admit(self, requests: list[Request]) -> None:
        ready = []
        for request in requests:
            try:
                if request.adapter is not None:
                    self.prepare(request.adapter)
                ready.append(request)
            except Exception as err:  # noqa: BLE001 - the error goes to its request, the engine keeps serving
                _fail(request, err)
                self._waiting.done(request)  # never prepared: nothing to release
        if not ready:
            return
        if self.packed is not None:  # a load may have put new LoRA layers around the packed weights
            self.packed.cover()
        ready.sort(key=_group_key)
        try:
            logits, joining = self._prompt_pass(ready)
        except Exception as err:
            for request in ready:  # not in the batch yet: fail and release them here
                _fail(request, err)
                self._leave(request)
            raise
        if self._cache is None:
            self._cache = joining
        else:
            self._cache.extend(joining)
        self._running += ready
        self._rows_changed = True
        last = self._choose(ready, logits)
        self._last = last if self._last is None else torch.cat([self._last, last])
        self._regroup()

    def _prompt_pass(self, ready: list[Request]) -> tuple[torch.Tensor, BatchCache]:
        """The joining requests' prompts, run together: (last-position logits (N, V), their cache)."""
        ids, mask = left_padded([r.prompt_ids for r in ready], self.pad_id)  # every prompt ends in the last column
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        with rows_use_plan(RowPlan(row_segments([r.adapter for r in ready]))):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device), cache=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1]
        return logits, BatchCache(cache, mask.to(self.device))

    def _decode(self) -> None:
        lengths = self._cache.lengths
        self._cache.grow()
        if self._plan is None or self._rows_changed:  # its stacked matrices serve every step until then
            self._plan = RowPlan(row_segments([r.adapter for r in self._running]), stacked=True, earlier=self._plan)
            self._rows_changed = False
        with rows_use_plan(self._plan):
            logits = self.model(input_ids=self._last[:, None].to(self.device), attention_mask=self._cache.mask,
                                position_ids=lengths[:, None], cache=self._cache.cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1]
        self._last = self._choose(self._running, logits)
        self._regroup()

    def _choose(self, requests: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token, sent on to its request; (B,) on CPU. A row whose logits are not
        finite, or whose sampling fails, fails its own request (its row leaves at the regroup)."""
        logits = logits.float().cpu()  # one transfer; sampling runs on CPU with each request's generator
        # A row's largest logit is NaN if any of its logits is, +inf if one is: one reduction, where
        # isfinite over (B, V) cost 2 ms a step. -inf logits (a masked token) are legitimate.
        sound = torch.isfinite(logits.max(dim=1).values)  # (B,)
        chosen = []
        for request, row, ok in zip(requests, logits, sound.tolist(), strict=True):
            try:
                if not ok:
                    raise RowError("the model produced NaN or infinite logits for this request")
                if request.params.json_object:
                    row = self._json_masked(request, row)
                chosen.append(next_token(row, request.params, request.generator))
            except Exception as err:  # noqa: BLE001 - this row's failure, not the batch's
                _fail(request, err)
                chosen.append(self.pad_id)
        for request, token in zip(requests, chosen, strict=True):
            if not _finished(request):  # failed or cancelled rows get nothing more
                self._append(request, token)
        return torch.tensor(chosen, dtype=torch.long)

    def _json_masked(self, request: Request, row: torch.Tensor) -> torch.Tensor:
        """``row`` with -inf on every token that would stop the answer being one JSON object."""
        if request.json_answer is None:
            request.json_answer = JsonObjectAnswer(self.tokenizer)
        allowed = torch.tensor(request.json_answer.allowed(request.ids), dtype=torch.long)
        masked = torch.full_like(row, float("-inf"))
        masked[allowed] = row[allowed]
        return masked

    def _append(self, request: Request, token: int) -> None:
        if token in self.eos_ids:
            return self._finish(request, "stop", self._text(request.ids))
        request.ids.append(token)
        text = self._text(request.ids)
        for stop in request.params.stop:
            if stop in text:
                return self._finish(request, "stop", text[:text.index(stop)])
        if len(request.ids) >= request.params.max_tokens:
            return self._finish(request, "length", text)
        # Hold back what could still become a stop string, and half a multi-byte character.
        hold = max((len(s) - 1 for s in request.params.stop), default=0)
        safe = len(text) - hold
        while safe > request.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > request.sent:
            _send(request, Event(text=text[request.sent:safe]))
            request.sent = safe
        return None

    def _finish(self, request: Request, reason: str, text: str) -> None:
        request.finish_reason = reason
        _send(request, Event(text=text[request.sent:], finish_reason=reason, prompt_tokens=len(request.prompt_ids),
                             completion_tokens=len(request.ids)))
        request.sent = len(text)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _regroup(self) -> None:
        """Drop finished rows and keep the rest grouped by adapter (a stable sort)."""
        keep = sorted((i for i, r in enumerate(self._running) if not _finished(r)),
                      key=lambda i: _group_key(self._running[i]))
        if keep == list(range(len(self._running))):
            return
        done = [r for r in self._running if _finished(r)]
        self._running = [self._running[i] for i in keep]
        self._rows_changed = True
        if not keep:  # the batch is empty: its stacks go too
            self._cache, self._last, self._plan = None, None, None
        else:
            index = torch.tensor(keep, dtype=torch.long)
            self._cache.select(index.to(self.device))
            self._last = self._last[index]
        for request in done:
            self._leave(request)

    def _leave(self, request: Request) -> None:
        """A request that held a row has left the batch for good."""
        if request.adapter is not None:
            self.release(request.adapter)
        self._waiting.done(request)


def _send(request: Request, event: Event) -> None:
    try:
        if request.deliver is None:
            request.events.put(event)
        else:
            request.deliver(event)
    except Exception:  # noqa: BLE001 - its consumer is gone (a closed event loop): end the request
        if request.finish_reason is None:
            request.finish_reason = "cancelled"


def _fail(request: Request, err: Exception) -> None:
    request.finish_reason, request.error, request.failure = "error", f"{type(err).__name__}: {err}", err
    _send(request, Event(text=request.error, finish_reason="error"))


def _finished(request: Request) -> bool:
    return request.finish_reason is not None


def _group_key(request: Request) -> tuple[bool, str]:
    return request.adapter is not None, request.adapter or ""
