"""`make demo`: decompose every weight of a small CNN with every factor form and report.

The embedded default is a small CNN (three 3×3 convolutions and two linear layers)
whose weights are drawn, from a fixed seed, with the power-law decay along both
channel modes that trained networks show (see `trained_like_weight`). Each conv weight is
decomposed as LoCon (`svd`), Tucker2 (`tucker2`) and CP (`cp`), each linear weight
by `svd`, at several ranks; the table gives parameters against the dense weight
and the relative Frobenius error of the recomposition. A plot of error vs
parameters is written beside it when matplotlib is installed.

Run: `python -m lowrank.demo [--out DIR] [--seed N]`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import decompose
from .forms import recompose

RANK_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def trained_like_weight(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A `(out, in, *k)` weight with power-law decay along both channel modes, plus noise.

    `W = core ×₀ U ×₁ V` with orthonormal `U (out, out)`, `V (in, in)` and a Gaussian core
    scaled by `(p + 1)^-0.8 (q + 1)^-0.8`, so every unfolding has the decaying spectrum
    of trained weights rather than the flat one of a fresh initialisation.
    """

    def gaussian(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator, dtype=torch.float64)

    out_features, in_features = shape[:2]
    spatial = (1,) * (len(shape) - 2)
    decay_out = torch.arange(1, out_features + 1, dtype=torch.float64) ** -0.8
    decay_in = torch.arange(1, in_features + 1, dtype=torch.float64) ** -0.8
    core = gaussian(*shape) * decay_out.view(-1, 1, *spatial) * decay_in.view(1, -1, *spatial)
    left, _ = torch.linalg.qr(gaussian(out_features, out_features))
    right, _ = torch.linalg.qr(gaussian(in_features, in_features))
    weight = torch.einsum("tp,pq...,sq->ts...", left, core, right)
    weight += 0.01 * weight.std() * gaussian(*shape)
    return (weight / weight.std() / weight[0].numel() ** 0.5).float()


def demo_model(seed: int = 0) -> nn.Sequential:
    """The embedded default: a small image classifier with trained-like weights."""
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.copy_(trained_like_weight(tuple(module.weight.shape), generator))
    return model


@dataclass(frozen=True)
class Row:
    """One decomposition: which layer, form and rank, its size and its error."""

    layer: str
    shape: tuple[int, ...]
    form: str
    rank: str
    params: int
    dense_params: int
    rel_error: float


def decompose_layer(name: str, weight: torch.Tensor, seed: int) -> list[Row]:
    """Every form at every rank fraction for one weight `(out, in, *k)`.

    The rank of each form is that fraction of its largest meaningful rank: the matrix
    rank of the `(out, in·K)` unfolding for LoRA, the channel counts for Tucker2 (each
    of `r_out`, `r_in` capped), the same as LoRA for CP.
    """
    weight64 = weight.double()
    out_features, in_features = weight.shape[:2]
    max_rank = min(out_features, weight[0].numel())
    ranks = sorted({max(1, round(fraction * max_rank)) for fraction in RANK_FRACTIONS})
    forms = ("lora", "tucker2", "cp") if weight.ndim > 2 else ("lora",)
    rows = []
    for rank in ranks:
        for form in forms:
            if form == "lora":
                factors = decompose.svd(weight64, rank)
            elif form == "tucker2":
                ranks_pair = (min(rank, out_features), min(rank, in_features))
                factors = decompose.tucker2(weight64, ranks_pair)
            else:
                factors = decompose.cp(weight64, rank, seed=seed)
            error = float((recompose(factors) - weight64).norm() / weight64.norm())
            label = "×".join(str(r) for r in factors.rank) if form == "tucker2" else str(rank)
            rows.append(Row(name, tuple(weight.shape), form, label, factors.num_params,
                            weight.numel(), error))
    return rows


def format_table(rows: list[Row]) -> str:
    """A plain-text table of `rows`."""
    header = (
        f"{'layer':8s} {'shape':>18s} {'form':8s} {'rank':>7s} {'params':>9s} "
        f"{'% dense':>8s} {'rel. error':>10s}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        shape = "×".join(str(s) for s in row.shape)
        lines.append(
            f"{row.layer:8s} {shape:>18s} {row.form:8s} {row.rank:>7s} {row.params:9d} "
            f"{100 * row.params / row.dense_params:7.1f}% {row.rel_error:10.4f}"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> bool:
    """Relative error vs fraction of dense parameters, one line per (layer, form)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = list(dict.fromkeys(r.layer for r in rows))
    styles = {"lora": ("o", "-"), "tucker2": ("s", "--"), "cp": ("^", ":")}
    for key in dict.fromkeys((r.layer, r.form) for r in rows):
        points = [r for r in rows if (r.layer, r.form) == key]
        marker, line = styles[key[1]]
        ax.plot([100 * r.params / r.dense_params for r in points],
                [r.rel_error for r in points], marker=marker, linestyle=line,
                color=f"C{layers.index(key[0])}", label=f"{key[0]} {key[1]}")
    ax.set_xlabel("parameters, % of the dense weight")
    ax.set_ylabel("relative Frobenius error")
    ax.set_title("lowrank demo: decomposition error vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Decompose a small CNN with every factor form.")
    parser.add_argument("--out", type=Path, default=Path("build/demo"), help="where the plot goes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = demo_model(args.seed)
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            rows.extend(decompose_layer(f"[{name}]", module.weight.detach(), args.seed))
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    image = args.out / "decompose.png"
    if plot(rows, image):
        print(f"\nplot: {image}")


if __name__ == "__main__":
    main()
