"""Which rank an adapter needs: the singular values of each layer's learned update s * B @ A.

An update of rank r can hold r directions; if 99% of its energy (the sum of its squared singular
values, its squared Frobenius norm) sits in the first 3, a rank of 3 would have done nearly the
same work, and ``lorakit resize`` can cut it there.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapter_math.updates import LayerUpdate
from lorakit.core.svd import product_svd, rank_for_energy

ENERGIES = (0.9, 0.99)


@dataclass
class LayerSpectrum:
    path: str
    r: int
    singular_values: list[float]  # of s * B @ A, largest first (r of them)

    def rank_for(self, energy: float) -> int:
        """The fewest singular values that hold ``energy`` of the update's energy (0 for a zero update)."""
        values = torch.tensor(self.singular_values, dtype=torch.float64)
        return 0 if not values.any() else rank_for_energy(values, energy)

    @property
    def kind(self) -> str:
        """The module's own name (q_proj, down_proj, ...), by which layers are grouped."""
        return self.path.rpartition(".")[2]


def spectra(updates: list[LayerUpdate]) -> list[LayerSpectrum]:
    return [LayerSpectrum(u.path, u.r, product_svd(u.lora_A, u.lora_B, u.scaling)[1].tolist()) for u in updates]


def report(spectra_: list[LayerSpectrum], shown: int = 4) -> str:
    """A table, one line per layer (its first ``shown`` singular values and the ranks that keep 90% and
    99% of its energy), then the median of those ranks per kind of module."""
    width = max(len(s.path) for s in spectra_)
    lines = [f"{'layer':<{width}}  {'r':>3}  {'rank90':>6}  {'rank99':>6}  singular values (largest first)"]
    for s in spectra_:
        values = " ".join(f"{v:.3g}" for v in s.singular_values[:shown]) + (" ..." if s.r > shown else "")
        lines.append(f"{s.path:<{width}}  {s.r:>3}  {s.rank_for(0.9):>6}  {s.rank_for(0.99):>6}  {values}")
    lines.append("")
    lines.append("median rank keeping 90% / 99% of the update's energy, by module:")
    for kind in sorted({s.kind for s in spectra_}):
        group = [s for s in spectra_ if s.kind == kind]
        lines.append(f"  {kind:<16} x{len(group):<4} r={max(s.r for s in group):<4} "
                     f"{statistics.median(s.rank_for(0.9) for s in group):>5g} / "
                     f"{statistics.median(s.rank_for(0.99) for s in group):g}")
    overall = [s.rank_for(0.99) for s in spectra_]
    lines.append(f"  {'all':<16} x{len(spectra_):<4} 99% of every layer's energy: rank {max(overall)} "
                 f"(median {statistics.median(overall):g})")
    return "\n".join(lines)


def plot(spectra_: list[LayerSpectrum], path: Path, title: str) -> Path:
    """Two panels: each layer's cumulative energy against rank (the 90% and 99% lines marked), and its
    singular values relative to its largest, on a log scale; one colour per kind of module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({s.kind for s in spectra_})
    colours = {kind: plt.get_cmap("tab10")(i % 10) for i, kind in enumerate(kinds)}
    fig, (energy_ax, values_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in spectra_:
        values = torch.tensor(s.singular_values, dtype=torch.float64)
        if not values.any():
            continue
        ranks = range(1, len(values) + 1)
        energy_ax.plot(ranks, (torch.cumsum(values ** 2, 0) / (values ** 2).sum()).tolist(),
                       color=colours[s.kind], alpha=0.35, linewidth=0.8)
        values_ax.semilogy(ranks, (values / values[0]).clamp_min(1e-12).tolist(), color=colours[s.kind],
                           alpha=0.35, linewidth=0.8)
    for energy in ENERGIES:
        energy_ax.axhline(energy, color="grey", linestyle="--", linewidth=0.8)
    energy_ax.set_xscale("log", base=2)
    energy_ax.set(xlabel="rank k", ylabel="energy kept by the first k", title="cumulative energy per layer")
    values_ax.set(xlabel="k", ylabel="singular value / largest", title="singular values per layer")
    handles = [plt.Line2D([], [], color=colours[kind], label=kind) for kind in kinds]
    values_ax.legend(handles=handles, fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
