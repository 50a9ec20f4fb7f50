"""`lorakit rank`: which rank an adapter needs, from the singular values of its layers' updates."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser(
        "rank",
        help="singular values of each layer's learned update, and the rank that keeps 90%% / 99%% of it",
        description="For every layer of ADAPTER, the singular values of its learned update s*B*A (exact, from "
        "A and B, with no base model), the rank that keeps 90%% and 99%% of the update's energy (its squared "
        "Frobenius norm), and those ranks' median per kind of module. Writes the spectra as a PNG (cumulative "
        "energy and relative singular values per layer). If 99%% of every layer sits in far fewer than r "
        "directions, a smaller r would have done: `lorakit resize --rank` cuts the adapter down.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("adapter", type=Path, help="LoRA adapter directory")
    parser.add_argument("--plot", type=Path, help="PNG to write (default: ADAPTER/rank_spectrum.png)")
    parser.add_argument("--show", type=int, default=4, help="singular values printed per layer")
    parser.set_defaults(run=_rank)


def _rank(args: argparse.Namespace) -> int:
    from lorakit.adapter_math.spectrum import plot, report, spectra
    from lorakit.adapter_math.updates import layer_updates
    from lorakit.files.peft_format import read_adapter

    found = spectra(layer_updates(read_adapter(args.adapter), str(args.adapter)))
    print(report(found, args.show))
    picture = plot(found, args.plot or args.adapter / "rank_spectrum.png", f"{args.adapter}: spectrum of s*B*A")
    print(f"spectra plotted in {picture}")
    return 0
