"""`make demo`: adapt a small CNN to new classes, end to end, on scikit-learn's bundled digits.

1. Train a small CNN on the 8×8 digits 0–4 (the data ships with scikit-learn).
2. Print `lowrank bounds` for each of its layers at the adapter's rank.
3. Inject adapters (Tucker2 on the convolutions, LoRA on the linear layers) and fine-tune
   them alone on the digits 5–9; report trainable parameters, accuracy before and after and
   the time per step.
4. Merge into a dense model and check that it computes what the adapted model does.
5. Save the adapter as a PEFT folder, merge it into the base checkpoint as a dense
   checkpoint (both with `lowrank.io`), reload both and check again.
6. Plot the loss and the accuracy.

Run: `python -m lowrank.demo [--out DIR] [--seed N]`; needs scikit-learn (extra `demo`).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import cli
from . import nn as lnn
from .nn.fit import layer_sizes

BATCH = 64
SMOOTHING = 0.1
TARGETS = {
    "0": {"r": [2, 1], "form": "tucker2"},
    "2": {"r": [4, 4], "form": "tucker2"},
    "5": {"r": [4, 4], "form": "tucker2"},
    "8": {"r": 8, "alpha": 16},
    "10": {"r": 8, "alpha": 16},
}


def small_cnn() -> nn.Sequential:
    """Three 3×3 convolutions and two linear layers for 1×8×8 images, 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@dataclass
class Split:
    """Images `(N, 1, 8, 8)` in [0, 1] and labels `(N,)`, train and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def digits(labels: range, seed: int) -> Split:
    """scikit-learn's 1797 bundled 8×8 digits with these labels, 80 % train / 20 % test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        hint = "the demo needs scikit-learn: pip install 'lowrank-kernels[demo]'"
        raise SystemExit(hint) from None
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    target = torch.tensor(data.target)
    keep = torch.isin(target, torch.tensor(list(labels)))
    images, target = images[keep], target[keep]
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    train, test = order[:cut], order[cut:]
    return Split(images[train], target[train], images[test], target[test])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of `x` that `model` classifies as `y`."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@dataclass
class History:
    """Loss per step, test accuracy per epoch, seconds per step."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def fit(model: nn.Module, data: Split, epochs: int, lr: float, seed: int) -> History:
    """Adam on the trainable parameters, cosine-decayed learning rate, batches of 64,
    cross-entropy."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    steps = epochs * -(-len(data.train_y) // BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    history = History()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(data.train_y), generator=generator).split(BATCH):
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.train_x[batch]), data.train_y[batch],
                                   label_smoothing=SMOOTHING)
            loss.backward()
            optimizer.step()
            schedule.step()
            history.step_seconds.append(time.perf_counter() - start)
            history.loss.append(float(loss.detach()))
        history.accuracy.append(accuracy(model, data.test_x, data.test_y))
    return history


def print_bounds(model: nn.Module) -> None:
    """`lowrank bounds` for every adapted layer at its adapter's rank."""
    for name, settings in TARGETS.items():
        sizes = layer_sizes(model.get_submodule(name))
        rank = settings["r"]
        argv = ["bounds", "--in", str(sizes.in_features), "--out", str(sizes.out_features),
                "--rank", ",".join(map(str, rank)) if isinstance(rank, list) else str(rank)]
        if sizes.kernel:
            argv += ["--kernel", "x".join(map(str, sizes.kernel))]
        print(f"$ lowrank {' '.join(argv)}    # layer [{name}]")
        cli.main(argv)
        print()


def max_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """max |a(x) − b(x)| over the logits."""
    a.eval()
    b.eval()
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def save_and_reload(model: nn.Module, base: nn.Module, dense: nn.Module, x: torch.Tensor,
                    out: Path) -> tuple[float, float]:  # fmt: skip
    """Save the adapters as a PEFT adapter folder (`lowrank.io`; the Tucker2 convolutions
    folded exactly into LoCon) and the base model as a safetensors checkpoint, merge the two
    into a dense checkpoint with `lowrank.io.merge_checkpoint`, then load the adapter into a
    fresh copy of the base and the dense checkpoint into a fresh model, and return how far
    each reload's logits are from the model it stands for."""
    from safetensors.torch import load_file, save_file

    from .io import inject_adapter, merge_checkpoint, model_adapter, save_adapter

    adapter_dir, base_path = out / "adapter_peft", out / "base.safetensors"
    dense_path = out / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_path)
    save_adapter(model_adapter(model), adapter_dir, "peft")
    merge_checkpoint(base_path, [adapter_dir], dense_path)
    reloaded = copy.deepcopy(base)
    inject_adapter(reloaded, adapter_dir)
    plain = small_cnn()
    plain.load_state_dict(load_file(dense_path))
    size = sum(p.stat().st_size for p in adapter_dir.iterdir())
    print(f"   adapter (PEFT)    {adapter_dir}/ ({size:,} B)")
    print(f"   dense checkpoint  {dense_path} ({dense_path.stat().st_size:,} B), merged by "
          f"lowrank.io from {base_path.name}")  # fmt: skip
    return max_difference(reloaded, model, x), max_difference(plain, dense, x)


def plot(base: History, tuned: History, before: float, path: Path) -> bool:
    """Loss per step and test accuracy per epoch of both trainings (`before`: the adapted
    model's accuracy before its first step); `False` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(base.loss, label="base model, digits 0–4 (all parameters)")
    steps = range(len(base.loss), len(base.loss) + len(tuned.loss))
    loss_ax.plot(steps, tuned.loss, label="adapters, digits 5–9 (adapters only)")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel(f"cross-entropy (label smoothing {SMOOTHING})")
    loss_ax.set_yscale("log")
    epochs = len(base.accuracy)
    acc_ax.plot(range(1, epochs + 1), [100 * a for a in base.accuracy], "o-",
                label="base model on digits 0–4")  # fmt: skip
    acc_ax.plot(range(epochs, epochs + len(tuned.accuracy) + 1),
                [100 * a for a in (before, *tuned.accuracy)], "s-",
                label="adapted model on digits 5–9")  # fmt: skip
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("test accuracy, %")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("lowrank demo: Tucker2 + LoRA adapters on scikit-learn's digits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Adapt a small CNN to new digits with lowrank.")
    parser.add_argument("--out", type=Path, default=Path("build/demo"), help="files and plot")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    old, new = digits(range(5), args.seed), digits(range(5, 10), args.seed)
    model = small_cnn()
    print(f"1. base model: {sum(p.numel() for p in model.parameters()):,} parameters, trained "
          f"on digits 0–4 ({len(old.train_y)} images)")  # fmt: skip
    base_history = fit(model, old, epochs=8, lr=3e-3, seed=args.seed)
    base_accuracy = base_history.accuracy[-1]
    print(f"   test accuracy on digits 0–4: {100 * base_accuracy:.1f} %\n")
    base = copy.deepcopy(model)

    print("2. parameter bounds of its layers at the adapters' ranks\n")
    print_bounds(model)

    lnn.inject(model, TARGETS)
    trainable, frozen = lnn.count_parameters(model)
    before = accuracy(model, new.test_x, new.test_y)
    tuned = fit(model, new, epochs=10, lr=1e-2, seed=args.seed)
    step_ms = 1e3 * sorted(tuned.step_seconds)[len(tuned.step_seconds) // 2]
    base_ms = 1e3 * sorted(base_history.step_seconds)[len(base_history.step_seconds) // 2]
    print("3. adapters (Tucker2 on the convolutions, LoRA on the linear layers), digits 5–9")
    for name, adapter in lnn.adapters(model).items():
        print(f"   [{name}] {adapter.form} rank {adapter.rank}: {adapter.num_params:,} parameters")
    print(f"   trainable {trainable:,} of {trainable + frozen:,} parameters "
          f"({100 * trainable / (trainable + frozen):.2f} %)")
    print(f"   test accuracy on digits 5–9: {100 * before:.1f} % before, "
          f"{100 * tuned.accuracy[-1]:.1f} % after {len(tuned.accuracy)} epochs")
    print(f"   median time per step: {step_ms:.2f} ms (training all of the base: {base_ms:.2f} ms)")
    kept = accuracy(base, old.test_x, old.test_y)
    print(f"   digits 0–4 through the base model: {100 * kept:.1f} % (its weights are untouched)\n")

    dense = lnn.merge_and_unload(copy.deepcopy(model))
    test_x = torch.cat([old.test_x, new.test_x])
    merge_gap = max_difference(dense, model, test_x)
    print("4. merged into a dense model: "
          f"{', '.join(sorted({type(m).__name__ for m in dense.modules()} - {'Sequential'}))}")
    print(f"   max |merged − adapted| logit over {len(test_x)} test images: {merge_gap:.2e}\n")

    print("5. saved and reloaded")
    adapter_gap, dense_gap = save_and_reload(model, base, dense, test_x, args.out)
    print(f"   max |reloaded − saved| logit: adapter {adapter_gap:.2e}, dense {dense_gap:.2e}\n")

    image = args.out / "finetune.png"
    if plot(base_history, tuned, before, image):
        print(f"6. plot: {image}")
    if max(merge_gap, adapter_gap, dense_gap) > 1e-4:
        raise SystemExit("the merged or reloaded model does not compute what the adapted one does")


if __name__ == "__main__":
    main()
