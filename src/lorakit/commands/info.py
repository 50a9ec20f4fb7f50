"""`lorakit info DIR`: what an adapter directory holds, read from the file header alone."""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from lorakit.core.config import lora_scaling


def register(commands) -> None:
    info = commands.add_parser(
        "info",
        help="show what an adapter directory holds",
        description="Show what an adapter directory holds: base model, rank and scaling, the modules it "
        "adapts, parameter count and size. Reads lorakit's and PEFT's adapters; reads only the file header, "
        "so it is instant even for large adapters.",
    )
    info.add_argument("adapter", type=Path, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    info.set_defaults(run=_info)


def _info(args: argparse.Namespace) -> int:
    from lorakit.files.peft_format import PREFIX, read_adapter_header, split_adapter_key

    config, header, size = read_adapter_header(args.adapter)
    matrices: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)  # path -> {"A": shape, "B": shape}
    whole: dict[str, int] = {}  # other tensors (saved modules, biases) -> parameter count
    for key, (shape, _) in header.items():
        path, part, _ = split_adapter_key(key.removeprefix(PREFIX))
        if part is None:
            whole[path] = math.prod(shape)
        else:
            matrices[path][part] = shape
    groups: dict[str, list[dict[str, tuple[int, ...]]]] = defaultdict(list)  # by last name: "q_proj"
    for path, pair in matrices.items():
        groups[path.rpartition(".")[2]].append(pair)
    total = sum(math.prod(shape) for shape, _ in header.values())
    dtypes = sorted({dtype for _, dtype in header.values()})

    scaling = "alpha/sqrt(r)" if config.use_rslora else "alpha/r"
    rows = [
        ("adapter", str(args.adapter)),
        ("base model", config.base_model_name_or_path or "(not recorded)"),
        ("rank", (f"r={config.r}, alpha={config.alpha:g}, scaling {scaling} = "
                 f"{lora_scaling(config.alpha, config.r, config.use_rslora):g}")),
    ]
    if config.rank_pattern or config.alpha_pattern:
        rows.append(("overrides", f"rank {config.rank_pattern or '{}'}, alpha {config.alpha_pattern or '{}'}"))
    if config.use_dora:
        rows.append(("variant", "DoRA (a trained magnitude per output unit: lora_magnitude_vector)"))
    rows.append(("dropout", f"{config.dropout:g}"))
    rows.append(("targets", f"{sum(len(v) for v in groups.values())} modules"))
    for leaf, pairs in sorted(groups.items()):
        ranks = ",".join(str(r) for r in sorted({pair.get("A", (0,))[0] for pair in pairs}))
        first = pairs[0]
        rows.append(("", f"{leaf:<16} x{len(pairs):<4} r={ranks:<4} A {first.get('A')}  B {first.get('B')}"))
    if whole:
        names = sorted(whole)
        rows.append(("saved whole", f"{len(names)} tensors, {sum(whole.values()):,} parameters: "
                     + ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")))
    rows.append(("parameters", f"{total:,} ({', '.join(dtypes)})"))
    rows.append(("size", f"{size / 1e6:.2f} MB on disk"))
    for label, value in rows:
        print(f"{label:<13}{value}")
    return 0

