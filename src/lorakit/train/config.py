"""TrainConfig: every setting of a training run, read from a YAML recipe and overridable by flag.

    lorakit train --config configs/smollm2-orders.yaml --lr 5e-4 --max-steps 200

Each field below becomes a flag (``max_steps`` -> ``--max-steps``) whose help is the field's
description. Precedence: flag, then YAML, then the default here.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorakit.argtypes import finite_float, split_keys
from lorakit.core.checks import check_int, check_number
from lorakit.core.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.methods.method import METHOD_NAMES, MethodSettings, method_named
from lorakit.quant.groupwise import QuantSpec
from lorakit.train.precision import COMPUTE_DTYPES

DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("causal-lm", "image-classification")
PARALLEL = ("ddp", "fsdp")
# Fields that may differ when resuming: they change neither the maths nor the data order.
RESUMABLE_CHANGES = frozenset({"eval_every", "save_every", "threads", "progress", "parallel"})


def _doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    base: str = _doc("base model: a model directory, a .gguf file, or 'smollm2' (the embedded default)", "smollm2")
    train: str = _doc("training data: chat or prompt/completion JSONL", "data/orders/train.jsonl")
    val: str | None = _doc("validation JSONL for periodic validation loss (empty: none)", "data/orders/val.jsonl")
    output: str = _doc("directory for the adapter, checkpoints, metrics.jsonl and loss.png", "out/orders")
    r: int = _doc("LoRA rank", 16)
    alpha: float = _doc("LoRA alpha; the update is scaled by alpha / r", 32.0)
    dropout: float = _doc("dropout on the adapters' input", 0.0)
    use_rslora: bool = _doc("rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r", False)
    use_dora: bool = _doc("DoRA: also learn each output unit's length (weight-decomposed LoRA; PEFT's use_dora)",
                          False)
    init: str = _doc("how LoRA's A and B start: default (B = 0), gaussian, pissa (the weight's top singular "
                     "vectors, the rest left in the base; pissa_niter_N: randomised SVD, N iterations, fast on "
                     "large layers) or olora (QR); pissa and olora adapters are saved as plain LoRA for the "
                     "untouched base", "default")
    loraplus_lr_ratio: float = field(default=0.0, metadata={
        "help": "LoRA+: train B at this many times the learning rate of A (--loraplus-lr-ratio alone: 16); 0: off",
        "const": 16.0})
    method: str = _doc("how to adapt the model: lora, full (every weight), prompt (prompt tuning), prefix (prefix "
                       "tuning), ia3 or adapter (bottleneck adapters); r, alpha, dropout and target_modules are "
                       "LoRA's", "lora")
    num_virtual_tokens: int = _doc("prompt and prefix tuning: virtual tokens before every input", 20)
    prefix_projection: int = _doc("prefix tuning: make the prefix with an MLP of this hidden width while training "
                                  "(PEFT's prefix_projection; the file holds the prefix it makes); 0: learn the "
                                  "prefix itself", 0)
    adapter_size: int = _doc("bottleneck adapters: the bottleneck's width", 64)
    adapter_placement: str = _doc("bottleneck adapters: after each layer's FFN (ffn, Pfeiffer) or after its "
                                  "attention too (both, Houlsby)", "ffn")
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "modules to adapt: all-linear, or names such as q_proj v_proj"})
    epochs: int = _doc("passes over the training data (when max_steps is 0)", 1)
    max_steps: int = _doc("optimizer steps to take; 0 means epochs x steps per epoch", 0)
    batch_size: int = _doc("examples per forward pass", 8)
    grad_accum: int = _doc("forward passes per optimizer step (effective batch = batch_size x grad_accum)", 1)
    lr: float = _doc("peak learning rate of AdamW (0: the method's own default: lora 1e-3, full 5e-5, prompt 3e-2, "
                     "prefix 1e-2, ia3 5e-3, adapter 1e-3)", 0.0)
    weight_decay: float = _doc("AdamW weight decay on the adapter matrices", 0.0)
    warmup_steps: int = _doc("steps of linear warm-up from 0 to lr", 10)
    min_lr_ratio: float = _doc("the cosine decay ends at lr x this", 0.1)
    max_grad_norm: float = _doc("clip the gradient's global norm to this (0: no clipping)", 1.0)
    max_length: int = _doc("longest example in tokens; longer ones are truncated (with a warning)", 512)
    copy_fields: list[str] = field(default_factory=list, metadata={
        "help": "JSON keys (e.g. item,deliver_to) whose string values the answers copy from the prompt: "
                "such a value is tokenized where the prompt's tokens break it, so that copying the prompt "
                "token by token stays on a path the model was trained on; recorded beside the adapter "
                "(decoding.json), so that eval, generate and chat copy them too"})
    eval_every: int = _doc("validate every N steps (0: only at the end)", 50)
    save_every: int = _doc("checkpoint every N steps (0: only at the end)", 50)
    seed: int = _doc("seed for adapter init, data order and dropout", 0)
    gradient_checkpointing: bool = _doc("recompute activations in backward: less memory, ~30% slower", False)
    dtype: str = _doc("dtype of the frozen base: float32, bfloat16 or float16 (adapters train in float32)", "float32")
    compute_dtype: str = _doc("dtype of the matrix products in training (autocast; weights, norms and adapters "
                              "keep theirs): float32, bfloat16, float16, or auto (bfloat16 where the device has "
                              "it natively, ~1.7x faster on such a CPU; float32 elsewhere)", "float32")
    quant_bits: int = _doc("keep the frozen base's linear layers quantized to 2, 3, 4 or 8 bits and train QA-LoRA, "
                           "which merges into them exactly (0: a float base and plain LoRA)", 0)
    quant_group_size: int = _doc("quantization group along the input dimension (32, 64 or 128); the embedded "
                                 "SmolLM2 at 4 bits, group 32, keeps its GGUF Q4_1 weights as they are", 32)
    parallel: str = _doc("how several processes (--nproc, torchrun) share the model: ddp (each holds all of "
                         "it) or fsdp (each decoder layer sharded across them, for a base too big for one device)",
                         "ddp")
    task: str = _doc("what the model learns: causal-lm (chat or prompt/completion JSONL on a language model) or "
                     "image-classification (train/val name image sets such as fashion-mnist/train, on base "
                     "mobilenet_v2, target_modules all-conv adapting every convolution)", "causal-lm")
    image_size: int = _doc("image-classification: side the images are resized to", 64)
    augment: bool = _doc("image-classification: shift and mirror training images at random", True)
    threads: int = _doc("CPU threads for torch (0: torch's default)", 0)
    progress: bool = _doc("draw a progress bar", True)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not isinstance(self.copy_fields, (str, list)):
            raise ConfigError("copy_fields must be JSON keys such as item,deliver_to")
        names = [self.copy_fields] if isinstance(self.copy_fields, str) else self.copy_fields
        self.copy_fields = [key for key in split_keys(",".join(map(str, names))) if key]  # none: off, as in eval
        if not isinstance(self.target_modules, list) or not self.target_modules:
            raise ConfigError("target_modules must be 'all-linear' or a list of module names")
        # The LoRA settings are a LoraConfig's, checked by it: one set of rules for r, alpha, dropout
        # and targets, whether they come from a recipe or from code.
        self.lora = LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.lora_targets(),
                               use_rslora=self.use_rslora, use_dora=self.use_dora, init=self.init,
                               task_type="CAUSAL_LM")
        check_number("loraplus_lr_ratio", self.loraplus_lr_ratio, low=0)
        variants = [name for name, on in (("use_rslora", self.use_rslora), ("use_dora", self.use_dora),
                                          ("init", self.init != "default"),
                                          ("loraplus_lr_ratio", self.loraplus_lr_ratio)) if on]
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "quant_group_size", "image_size"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "seed", "threads", "quant_bits"):
            check_int(name, getattr(self, name), minimum=0)
        check_number("lr", self.lr, low=0)
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"method must be one of {', '.join(METHOD_NAMES)}; got {self.method!r}")
        if self.method != "lora" and (self.quant_bits or self.parallel == "fsdp" or self.task != "causal-lm"):
            raise ConfigError(f"method {self.method}: quant_bits (QA-LoRA), parallel fsdp and image classification "
                              "train LoRA only; use method lora or leave those settings out")
        if self.method != "lora" and variants:
            raise ConfigError(f"method {self.method}: {', '.join(variants)} are LoRA's settings; leave them out")
        if self.quant_bits and (self.use_dora or self.init not in ("default", "gaussian")):
            raise ConfigError("quant_bits trains QA-LoRA, whose exact merge into the quantized base has no DoRA "
                              "or PiSSA/OLoRA form; leave use_dora and init out, or quant_bits")
        check_int("num_virtual_tokens", self.num_virtual_tokens, minimum=1)
        check_int("adapter_size", self.adapter_size, minimum=1)
        check_int("prefix_projection", self.prefix_projection, minimum=0)
        if self.method in ("prompt", "prefix") and self.gradient_checkpointing:
            raise ConfigError(f"method {self.method} keeps its virtual tokens in the key/value cache, which "
                              "transformers drops inside checkpointed layers; leave gradient_checkpointing off")
        if self.prefix_projection and self.method != "prefix":
            raise ConfigError("prefix_projection applies to method prefix only")
        if self.adapter_placement not in ("ffn", "both"):
            raise ConfigError(f"adapter_placement must be ffn or both; got {self.adapter_placement!r}")
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("max_grad_norm", self.max_grad_norm, low=0)
        check_number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        if self.quant_bits:
            QuantSpec(self.quant_bits, self.quant_group_size)  # a clear error for bad bits or groups
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}; got {self.parallel!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        self.val = self.val or None

    def lora_targets(self) -> str | tuple[str, ...]:
        """target_modules in LoraConfig's form."""
        if self.target_modules == ["all-linear"]:
            return "all-linear"
        return tuple(self.target_modules)

    @property
    def learning_rate(self) -> float:
        """lr, or the method's own default when lr is 0."""
        return self.lr or method_named(self.method).default_lr

    def method_settings(self) -> MethodSettings:
        return MethodSettings(self.num_virtual_tokens, self.adapter_size, self.adapter_placement,
                              self.prefix_projection, self.seed)

    def quant_spec(self) -> QuantSpec | None:
        return QuantSpec(self.quant_bits, self.quant_group_size) if self.quant_bits else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def changed_fields(self, other: TrainConfig) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe's fields, checked against TrainConfig's names."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value")
    types = {f.name: f.type for f in fields(TrainConfig)}
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; "
                          f"valid settings: {', '.join(sorted(types))}")
    for name, value in data.items():
        if types[name] == "float" and isinstance(value, str):
            data[name] = _yaml_float(path, name, value)
    return data


def _yaml_float(path: Path, name: str, text: str) -> float:
    # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it obviously is.
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{path}: {name} must be a number, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field. A flag not given leaves no attribute (argparse.SUPPRESS), so only flags on
    the command line override, and the help shows the field's own default, not argparse's."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        shown = f.default_factory() if f.default is dataclasses.MISSING else f.default
        # argparse treats help as a %-format string: a bare % ("~30% slower") would print its
        # parameters' dict in the middle of the text.
        text = f"{f.metadata['help']} (default: {_show(shown)})".replace("%", "%%")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif f.type.startswith("list"):
            parser.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="NAME", help=text)
        else:
            kind = {"int": int, "float": finite_float}.get(f.type, str)
            optional = {"nargs": "?", "const": f.metadata["const"]} if "const" in f.metadata else {}
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(), help=text,
                                **optional)


def from_sources(yaml_path: str | Path | None, args: argparse.Namespace | None,
                 saved: dict[str, Any] | None = None) -> TrainConfig:
    """Flags over YAML over ``saved`` (a resumed run's settings) over the defaults."""
    values = dict(saved or {})
    values.update(load_yaml(yaml_path) if yaml_path else {})
    if args is not None:
        values.update({f.name: getattr(args, f.name) for f in fields(TrainConfig)
                       if getattr(args, f.name, None) is not None})
    return TrainConfig(**values)


def _show(value: Any) -> str:
    return (" ".join(value) or "none") if isinstance(value, list) else str(value)
