"""Small models, checkpoints and adapter factors for the `lowrank.io` tests, and float64
references of ΔW written from the formulas (einsum), not through `lowrank.forms`."""

from __future__ import annotations

import hashlib
import json
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class Block(nn.Module):
    """Linear layers, a 3×3 and a 1×1 convolution, and a norm; names with underscores."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_out": nn.Linear(8, 6)})
        self.conv_in = nn.Conv2d(4, 6, 3, padding=1)
        self.proj_out = nn.Conv2d(6, 4, 1)
        self.norm = nn.LayerNorm(8)


class Tiny(nn.Module):
    """Two blocks, a head and an integer buffer: the base of the io tests."""

    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 3)
        self.register_buffer("position_ids", torch.arange(5))

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """`x (N, 8)`, `image (N, 4, H, W)` → a tensor mixing every weight."""
        out = 0.0
        for block in self.down_blocks:
            h = block.attn["to_out"](block.attn["to_q"](block.norm(x)))
            out = out + self.head(h).sum() + block.proj_out(block.conv_in(image)).sum()
        return out


def tiny(seed: int = 0) -> Tiny:
    """A `Tiny` with weights drawn from `seed`."""
    torch.manual_seed(seed)
    return Tiny()


TARGETS = ("attn.to_q", "attn.to_out", "conv_in", "proj_out", "head")


def targets(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of `model` the tests put adapters on."""
    return {n: m for n, m in model.named_modules() if n.endswith(TARGETS)}


def lora_factors(
    weight_shape: tuple[int, ...], rank: int, g: torch.Generator, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random `down (r, in, *k)`, `up (out, r, 1…)` for a weight of `weight_shape`."""
    out_f, *rest = weight_shape
    down = torch.randn(rank, *rest, generator=g, dtype=torch.float64) * 0.3
    up = torch.randn(out_f, rank, *([1] * (len(rest) - 1)), generator=g, dtype=torch.float64)
    return down.to(dtype), (up * 0.3).to(dtype)


def lora_delta64(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · up ⋅ down in float64, by einsum over the rank."""
    flat = torch.einsum("or,ri->oi", up.double().flatten(1), down.double().flatten(1))
    return scale * flat.reshape(up.shape[0], *down.shape[1:])


def tucker_delta64(
    down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, scale: float
) -> torch.Tensor:
    """ΔW[o, i, ·] = scale · Σ up[o, p] mid[p, q, ·] down[q, i] in float64."""
    return scale * torch.einsum(
        "op,pq...,qi->oi...", up.double().flatten(1), mid.double(), down.double().flatten(1)
    )


def save_state(state: dict[str, torch.Tensor], path: Path, dtype=None) -> Path:
    """`state` (floating tensors cast to `dtype`) as one safetensors file."""
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in state.items()
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int, dtype=None) -> Path:
    """`state` as `model-0000k-of-0000N.safetensors` shards and their index; the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state[key] for key in keys[k::shards]}
        save_state(part, folder / name, dtype)
        weight_map.update(dict.fromkeys(part, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def digest(paths: list[Path]) -> dict[str, str]:
    """SHA-256 of every file under `paths` (files or folders), to show inputs are unchanged."""
    files = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def listing(folder: Path) -> set[str]:
    """Every file and folder under `folder`, relative, to show no output was left behind."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


ORIGINAL_FORMS = {
    # (down key, up key, alphas kept)
    "lora_A": ("lora_A.weight", "lora_B.weight", False),
    "lora_A+alpha": ("lora_A.weight", "lora_B.weight", True),
    "lora_down": ("lora_down.weight", "lora_up.weight", True),
}
"""The factor keys of a diffusion model's LoRA in its original layout (`diffusion_model.…`) as
ComfyUI and ai-toolkit save them, and whether its layers keep their `.alpha`."""


def stand_in_pipeline(mixin, names, absent=()):
    """A stand-in pipeline class with `mixin`'s LoRA loader, holding the models `names` (its
    constructor's arguments, in that order) and None for the models `absent`."""

    class Pipeline(mixin):
        hf_device_map = None

        def __init__(self, *models):
            for name in absent:
                setattr(self, name, None)
            for name, model in zip(names, models, strict=True):
                setattr(self, name, model)

        @property
        def components(self):
            return {name: getattr(self, name) for name in names}

    return Pipeline


class Net(nn.Module):
    """A linear layer, a 3×3 and a 1×1 convolution; sizes LoKr can factor (64 = 8·8, …)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 96)
        self.conv = nn.Conv2d(32, 48, 3, padding=1)
        self.proj = nn.Conv2d(48, 32, 1)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), self.proj(self.conv(image))


def net(seed: int = 0) -> Net:
    """A `Net` with weights drawn from `seed`."""
    torch.manual_seed(seed)
    return Net()


INPUTS = (torch.randn(3, 64, generator=torch.Generator().manual_seed(5)),
          torch.randn(2, 32, 6, 6, generator=torch.Generator().manual_seed(6)))  # fmt: skip


def outputs(model: nn.Module) -> torch.Tensor:
    """A `Net`'s (or a model wrapping one) outputs on `INPUTS`, flattened into one tensor."""
    with torch.no_grad():
        return torch.cat([y.flatten() for y in model(*INPUTS)])


def randomize(module: nn.Module, seed: int, std: float = 0.2) -> None:
    """Every parameter of `module` drawn from N(0, std²) with `seed`, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


class Expired(BaseException):
    """Raised by `deadline`: no `Exception`, which code under test might catch and go on."""


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Raise `Expired` in the block once `seconds` have passed (a read that blocks; a regex
    match, since `re` checks for signals while it matches)."""

    def expire(*_: object) -> None:
        raise Expired(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# the warnings a plain interpreter's default filters hide
_HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def as_printed(
    main: Callable[[Sequence[str]], int], argv: Sequence[object], capfd, caplog
) -> tuple[int, str, str]:
    """`(status, stdout, stderr)` of `main(argv)` run in this process, as a fresh process
    would print them: the file descriptors read (`capfd`, so that what a reader prints
    there counts), and on stderr a line per warning shown and per log record of WARNING or
    above, which a process prints there and pytest would keep to itself."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        status = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    shown = [w for w in warned if not issubclass(w.category, _HIDDEN_WARNINGS)]
    err += "".join(f"{w.category.__name__}: {w.message}\n" for w in shown)
    err += "".join(f"{r.getMessage()}\n" for r in caplog.records if r.levelno >= 30)
    return status, out, err
