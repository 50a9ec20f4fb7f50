"""Float32 Linear weights packed in oneDNN's layout for inference on a CPU.

PyTorch multiplies a float32 input by a Linear's weight with MKL's sgemm. For the few rows of
decoding that is the wrong kernel on the CPUs measured here: on a 2-core AMD EPYC (AVX2), a
(16, 576) x (576, 1536) product took 711 us with F.linear and 436 us with oneDNN over a weight
reordered once into its blocked layout (1 row: 388 against 212 us; 1024 rows: 13.2 against 11.5
ms), and SmolLM2's output head 23.5 against 12.6 ms at 16 rows; F.linear barely used the second
core at these sizes. In the serving engine a decoding step of 16 rows went from 205 to 154 ms.
The reordered weights are the same numbers in another order; products differ from F.linear's in
the last bits only (a different order of summation), like any other kernel's.

The packed copies sit beside the originals (the linear weights' bytes once more: 513 MiB for
SmolLM2, output head included) and follow them: a weight written since its copy was made (a merge,
a load) is packed again on its next use. Only products without gradients use them; training, other
dtypes, autocast and other devices compute with F.linear as before. Modules that multiply by their
weight with ``F.linear`` and nothing else take part: exactly ``nn.Linear`` and lorakit's LoRA
Linear (its adapters, DoRA's too, stay as they are; only the base product changes kernel), and a
quantized model's output head where it does not multiply from 8-bit codes (quant/int8_head.py).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.layers.linear import Linear as LoraLinear
from lorakit.process_memory import available_memory_bytes
from lorakit.quant.int8_head import Int8GridHead


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN and the packed-linear operators."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinearWeights:
    """Packs every eligible Linear weight of ``model`` (float32, on the CPU) and routes the
    modules' base products through the packed copies until ``release()``.

        packed = PackedLinearWeights(model)   # packed.nbytes: what the copies take
        model.generate(...)                   # same results up to the last bits, faster
        packed.release()                      # the modules compute with F.linear again

    A module is routed on its instance (its class is untouched). Loading or removing an adapter
    puts new modules around the same weights: ``cover()`` routes those too, reusing the copies.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # id(weight) -> its copy. Not a WeakKeyDictionary: that compares tensors with ==, elementwise.
        self._packs: dict[int, _Pack] = {}
        self._routed: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.declined_bytes = 0  # copies not made: they would not have fitted in memory
        self.cover()

    @property
    def nbytes(self) -> int:
        return sum(pack.nbytes for pack in self._packs.values())

    def cover(self) -> None:
        """Route every eligible module of the model not routed yet (after an adapter load or unload).
        New copies are made only while they take at most half the memory available now: where they
        would not fit, the modules keep computing with F.linear."""
        if not packing_available():
            return
        # A module with a forward of its own on the instance is left alone (another PackedLinearWeights routes it).
        modules = [m for m in self.model.modules()
                   if _multiplies_floats(m) and "forward" not in vars(m) and _packable(m.weight, m.bias)]
        unpacked = {id(m.weight): m.weight for m in modules if self._pack_of(m.weight) is None}
        needed = sum(w.numel() * w.element_size() for w in unpacked.values())
        available = available_memory_bytes() if needed else None  # nothing new (the usual admission): no read
        if available is not None and needed > available // 2:
            self.declined_bytes += needed
            return
        for module in modules:
            pack = self._pack_of(module.weight)
            if pack is None:
                pack = self._packs[id(module.weight)] = _Pack(module.weight)
            forward = _lora_forward if isinstance(module, LoraLinear) else _plain_forward
            module.forward = partial(forward, module, pack)
            self._routed.add(module)

    def _pack_of(self, weight: torch.Tensor) -> _Pack | None:
        pack = self._packs.get(id(weight))
        return pack if pack is not None and pack.of() is weight else None

    def release(self) -> None:
        """Drop the packed copies: the modules multiply with F.linear again."""
        for module in list(self._routed):
            del module.forward
        self._routed = weakref.WeakSet()
        self._packs.clear()


@contextlib.contextmanager
def packed_linear_weights(model: nn.Module) -> Iterator[PackedLinearWeights]:
    """Within: ``model``'s eligible Linear weights packed (PackedLinearWeights), released on leaving."""
    packed = PackedLinearWeights(model)
    try:
        yield packed
    finally:
        packed.release()


def _multiplies_floats(module: nn.Module) -> bool:
    """Whether ``module``'s product is F.linear with its float weight: nn.Linear, LoRA's Linear, and an
    output head on an 8-bit grid where it does not multiply from its codes (a float copy of a head
    that does would only cost memory: 113 MB for SmolLM2's)."""
    if type(module) is Int8GridHead:
        return not module.use_kernel or module.grid() is None
    return type(module) in (nn.Linear, LoraLinear)


def _packable(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A float32 weight (and bias) on the CPU. Inference tensors keep no version counter, so a write to
    one could not be noticed: those are left to F.linear. (A weight that trains is packed too: products
    that take gradients never use the copy.)"""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and not weight.is_inference()
            and (bias is None or bias.dtype == torch.float32))


class _Pack:
    """One module's packed weight and what it was made from (the weight's storage and version)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.of = weakref.ref(weight)
        self.nbytes = weight.numel() * weight.element_size()
        self.source: tuple[int, int] | None = None
        self.weight: torch.Tensor | None = None
        self.refresh(weight)

    def refresh(self, weight: torch.Tensor) -> None:
        """Pack ``weight`` again if it was written (or replaced) since the copy was made."""
        source = (weight.data_ptr(), weight._version)
        if source != self.source:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self.source = source

    def product(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b: with the packed weight where it applies, else with F.linear."""
        # Run for every layer of every decoding step, so the parameters are read from their dict
        # (Module.__getattr__ costs ~1 us a lookup) and the checks are written out.
        parameters = module._parameters
        weight, bias = parameters["weight"], parameters.get("bias")
        takes_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))
        # Under autocast F.linear multiplies in autocast's dtype, which the float32 copy would not.
        if (takes_grad or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                or not _packable(weight, bias)):
            return F.linear(x, weight, bias)
        self.refresh(weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None if bias is None else bias.detach(),
                                                  "none", [], "")


def _plain_forward(module: nn.Linear, pack: _Pack, x: torch.Tensor) -> torch.Tensor:
    return pack.product(module, x)


def _lora_forward(module: LoraLinear, pack: _Pack, x: torch.Tensor) -> torch.Tensor:
    return module._add_adapters(pack.product(module, x), x)
