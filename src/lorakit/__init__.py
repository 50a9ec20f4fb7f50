"""lorakit: Low-Rank Adaptation for any PyTorch model, in PEFT's file format.

    cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear")
    model = lorakit.inject(model, cfg)
    opt = torch.optim.AdamW(lorakit.lora_parameters(model), lr=2e-4)
    lorakit.save_adapter(model, "out/my-adapter")
"""

__version__ = "0.1.0"

from lorakit.core.adapters import (
    active_adapters,
    adapter_names,
    delete_adapter,
    disable_adapters,
    get_adapter_config,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    set_adapter,
)
from lorakit.core.config import LoraConfig
from lorakit.core.inject import inject
from lorakit.core.layers import Conv1d, Conv2d, Embedding, Linear, LoraLayer
from lorakit.core.merge import merge, merge_and_unload, unload, unmerge
from lorakit.errors import (
    AdapterFileError,
    ConfigError,
    LorakitError,
    MergeError,
    TargetError,
)
from lorakit.files.peft_format import (
    load_adapter,
    read_adapter,
    read_adapter_config,
    save_adapter,
)
from lorakit.files.state_dict import merge_adapter_into_state_dict

__all__ = [
    "AdapterFileError",
    "ConfigError",
    "Conv1d",
    "Conv2d",
    "Embedding",
    "Linear",
    "LoraConfig",
    "LoraLayer",
    "LorakitError",
    "MergeError",
    "TargetError",
    "__version__",
    "active_adapters",
    "adapter_names",
    "delete_adapter",
    "disable_adapters",
    "get_adapter_config",
    "inject",
    "load_adapter",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge",
    "merge_adapter_into_state_dict",
    "merge_and_unload",
    "read_adapter",
    "read_adapter_config",
    "save_adapter",
    "set_adapter",
    "unload",
    "unmerge",
]
