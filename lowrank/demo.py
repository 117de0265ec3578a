"""`make demo`: decompose every weight of a small CNN with every factor form and report.

The embedded default is a small CNN (three 3×3 convolutions and two linear layers)
whose weights are drawn with the power-law singular-value decay of trained
networks (σ_i ∝ i^-0.8 plus a little noise), from a fixed seed. Each conv weight is
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
    """A `(out, in, *k)` weight whose `(out, in·K)` unfolding has σ_i ∝ i^-0.8, plus noise."""
    out_features = shape[0]
    columns = int(torch.tensor(shape[1:]).prod())
    size = min(out_features, columns)
    def gaussian(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    left, _ = torch.linalg.qr(gaussian(out_features, size))
    right, _ = torch.linalg.qr(gaussian(columns, size))
    spectrum = torch.arange(1, size + 1, dtype=torch.float64) ** -0.8
    weight = (left * spectrum) @ right.T + 0.01 * gaussian(out_features, columns) / columns**0.5
    return (weight / weight.norm() * (out_features**0.5)).reshape(shape).float()


def demo_model(seed: int = 0) -> nn.Sequential:
    """The embedded default: a small image classifier with trained-like weights."""
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128 * 8 * 8, 256),
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
    rank: int
    params: int
    dense_params: int
    rel_error: float


def decompose_layer(name: str, weight: torch.Tensor, seed: int) -> list[Row]:
    """Every form at every rank fraction for one weight `(out, in, *k)`."""
    weight64 = weight.double()
    rows = []
    max_rank = min(weight.shape[0], weight[0].numel())
    forms = ("lora", "tucker2", "cp") if weight.ndim > 2 else ("lora",)
    for fraction in RANK_FRACTIONS:
        rank = max(1, round(fraction * max_rank))
        for form in forms:
            if form == "lora":
                factors = decompose.svd(weight64, rank)
            elif form == "tucker2":
                factors = decompose.tucker2(weight64, min(rank, *weight.shape[:2]))
            else:
                factors = decompose.cp(weight64, rank, seed=seed)
            error = float((recompose(factors) - weight64).norm() / weight64.norm())
            rows.append(Row(name, tuple(weight.shape), form, rank, factors.num_params,
                            weight.numel(), error))
    return rows


def format_table(rows: list[Row]) -> str:
    """A plain-text table of `rows`."""
    header = (
        f"{'layer':8s} {'shape':>18s} {'form':8s} {'rank':>5s} {'params':>9s} "
        f"{'% dense':>8s} {'rel. error':>10s}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        shape = "×".join(str(s) for s in row.shape)
        lines.append(
            f"{row.layer:8s} {shape:>18s} {row.form:8s} {row.rank:5d} {row.params:9d} "
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
    for key in dict.fromkeys((r.layer, r.form) for r in rows):
        points = [r for r in rows if (r.layer, r.form) == key]
        ax.plot([100 * r.params / r.dense_params for r in points],
                [r.rel_error for r in points], marker="o", label=f"{key[0]} {key[1]}")
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
