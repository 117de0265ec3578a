"""Random sequences of `lowrank.nn`'s public operations on a tiny model (an embedding, a
linear layer, a convolution, grouped or not, and a transformers `Conv1D`), valid and invalid,
checked after every step against a float64 reference computed by hand from a record of what
each adapter should hold: `W + scale · ΔW` of its factors (DoRA's `m ⊙ (W + sΔW) / ‖W + sΔW‖`),
ΔW recomposed here with `einsum` per group, never by lowrank.

After each step: every output, the merged weights, the factors (bit for bit), the base
weights (bit for bit after an exact unmerge), the `requires_grad` flags and the state-dict
keys. A refused call must raise a `LowRankError` subclass and leave every parameter, buffer,
flag and kept copy bitwise as it was. The default profile is a few seconds; the
`exhaustive` one runs longer sequences.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from strategies import machine_tests
from torch import nn

from lowrank import nn as lnn
from lowrank.errors import LowRankError, MergeError, NonFiniteError, ShapeError, StateDictError

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

NAMES = ("emb", "lin", "conv", "c1d")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the unit roundoff of each dtype
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# relative tolerance of an output or weight against the float64 reference, per dtype
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


class Net(nn.Module):
    """Four adaptable layers and one left alone (`norm`), each run on its own input."""

    def __init__(self, groups: int, padding_idx: int | None = None, padding_mode: str = "zeros",
                 stride: int = 1) -> None:  # fmt: skip
        super().__init__()
        self.emb = nn.Embedding(7, 5, padding_idx=padding_idx)
        self.lin = nn.Linear(5, 6)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, padding_mode=padding_mode,
                              stride=stride)  # fmt: skip
        self.c1d = Conv1D(6, 5)  # nf = out = 6, nx = in = 5: weight (5, 6)
        self.norm = nn.LayerNorm(6)


def inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "emb": torch.tensor([[0, 3, 6, 2], [5, 1, 4, 3]]),
        "lin": torch.randn(3, 5, generator=generator).to(dtype),
        "conv": torch.randn(2, 4, 5, 5, generator=generator).to(dtype),
        "c1d": torch.randn(3, 5, generator=generator).to(dtype),
    }


@dataclass
class Expected:
    """What one adapter should hold: its factors (and trainable scale, magnitude) as stored,
    the fixed scale, the unmerged base weight W as a float64 reference and, where known, as
    exact bits, and the merged state."""

    factors: dict[str, torch.Tensor]
    scale: float | None  # None: trainable, in `factors["scale"]`
    weight: torch.Tensor  # W, float64, in the layer's layout
    bits: torch.Tensor | None  # W bit for bit, where known
    merged_with: dict[str, torch.Tensor] | None = None  # factors merged into the weight
    exact: bool = False  # the merge kept a copy of W
    flags: dict[str, bool] = field(default_factory=dict)
    lost: bool = False  # a DoRA merge loaded from a state: W cannot be recovered
    drift: float = 0.0  # how far rounded subtracting unmerges may have moved W

    def copy(self) -> Expected:
        return Expected(
            {k: v.clone() for k, v in self.factors.items()},
            self.scale,
            self.weight.clone(),
            None if self.bits is None else self.bits.clone(),
            None if self.merged_with is None else dict(self.merged_with),
            self.exact,
            dict(self.flags),
            self.lost,
            self.drift,
        )


def reference_delta(name: str, form: str, groups: int, factors: dict) -> torch.Tensor:
    """ΔW at scale 1 in float64, `(out, in/g, *k)` (a linear-like layer's `(out, in)`),
    recomposed by hand, one group at a time (`groups` is the convolution's)."""
    groups = groups if name == "conv" else 1
    f = {k: v.double() for k, v in factors.items()}
    blocks = []
    for j in range(groups):
        def part(t: torch.Tensor, g: int = groups, j: int = j) -> torch.Tensor:
            size = t.shape[0] // g
            return t[j * size:(j + 1) * size]

        if form in ("lora", "centre_tap"):
            up = part(f["up"]).flatten(1)
            down = part(f["down"])
            block = torch.einsum("or,r...->o...", up, down)
            if form == "centre_tap" and name == "conv":
                tap = torch.zeros(*block.shape[:2], 3, 3, dtype=torch.float64)
                tap[:, :, 1, 1] = block[:, :, 0, 0]
                block = tap
        elif form == "tucker2":
            up, mid, down = part(f["up"]).flatten(1), part(f["mid"]), part(f["down"]).flatten(1)
            block = torch.einsum("op,pq...,qi->oi...", up, mid, down)
        else:  # cp
            out, inner = part(f["out_factor"]), part(f["in_factor"])
            spatial = [f[k] for k in sorted(k for k in f if k.startswith("spatial"))]
            rank = out.shape[1]
            spatial = [s[:, j * rank:(j + 1) * rank] for s in spatial]
            letters = "abc"[: len(spatial)]
            terms = ",".join(f"{a}r" for a in letters)
            block = torch.einsum(f"or,ir{',' if spatial else ''}{terms}->oi{letters}",
                                 out, inner, *spatial)  # fmt: skip
        blocks.append(block)
    return torch.cat(blocks)


def layout(name: str, delta: torch.Tensor) -> torch.Tensor:
    """ΔW `(out, in…)` in the layer's weight layout (an embedding's and a Conv1D's `(in, out)`)."""
    return delta.t() if name in ("emb", "c1d") else delta


def effective(name: str, form: str, groups: int, dora: bool, weight: torch.Tensor,
              factors: dict, scale: float | None) -> torch.Tensor:  # fmt: skip
    """The layer's effective weight in float64, in its layout: `W + s ΔW`, or DoRA's."""
    s = factors["scale"].double().reshape(()) if scale is None else scale
    delta = layout(name, s * reference_delta(name, form, groups, factors))
    updated = weight + delta
    if not dora:
        return updated
    channels = layout(name, updated)  # (out, in, *k)
    norm = torch.linalg.vector_norm(channels.flatten(1), dim=1)
    magnitude = factors["magnitude"].double()
    shape = (-1,) + (1,) * (channels.ndim - 1)
    return layout(name, channels * (magnitude / norm).reshape(shape))


def run_reference(name: str, base: nn.Module, weight: torch.Tensor, x: torch.Tensor,
                  groups: int) -> torch.Tensor:  # fmt: skip
    """The base layer's operation in float64 with `weight` (its layout)."""
    bias = None if getattr(base, "bias", None) is None else base.bias.double()
    if name == "emb":  # padding_idx: no gradient from the padding row
        return F.embedding(x, weight, base.padding_idx)
    if name == "lin":
        return F.linear(x.double(), weight, bias)
    if name == "conv":
        x = x.double()
        if base.padding_mode != "zeros":
            x = F.pad(x, (1, 1, 1, 1), mode=base.padding_mode)
        padding = 1 if base.padding_mode == "zeros" else 0
        return F.conv2d(x, weight, bias, stride=base.stride, padding=padding, groups=groups)
    return x.double() @ weight + bias


def snapshot(model: nn.Module) -> dict:
    """Everything a refused call must leave as it was, bit for bit."""
    state = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        state["p:" + name] = (t.detach().clone(), t.requires_grad)
    for name, t in model.named_buffers(remove_duplicate=False):
        state["b:" + name] = t.detach().clone()
    for name, module in model.named_modules():
        state["m:" + name] = type(module)
        if isinstance(module, lnn.LowRankAdapter):
            state["f:" + name] = (module.merged, module.residual, module.disabled)
            kept = module.merged_factors
            state["k:" + name] = None if kept is None else {k: v.clone() for k, v in kept.items()}
    return state


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)


def same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            assert value[1] == other[1], key
            value, other = value[0], other[0]
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and bitwise_equal(value, other), key
        elif isinstance(value, dict):
            assert value.keys() == other.keys(), key
            for k in value:
                assert bitwise_equal(value[k], other[k]), (key, k)
        else:
            assert value == other, key


def _replace(adapter: lnn.LowRankAdapter, key: str, value: nn.Parameter) -> nn.Parameter:
    """Put `value` in place of the adapter's factor `key` (`spatial_factors.0` too); return
    the factor it replaces."""
    owner = adapter.get_submodule(key.rpartition(".")[0]) if "." in key else adapter
    local = key.rpartition(".")[2]
    kept = owner._parameters[local]
    owner._parameters[local] = value
    return kept


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("form", ["lora", "tucker2", "cp"])
def test_a_factor_of_another_shape_is_a_shape_error_in_every_form_and_grouping(form, groups):
    """Found by the state machine: a factor replaced by one with another number of rows (a
    grouped convolution's factors, or CP's) made every ΔW a torch `RuntimeError` from the
    split into groups, instead of a `ShapeError` naming it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=groups), nn.Linear(3, 3))
    lnn.inject(model, {"0": {"r": [2, 2] if form == "tucker2" else 2, "form": form}, "1": {}},
               rank=2)  # fmt: skip
    adapter = model[0]
    with torch.no_grad():
        for factor in adapter.factor_tensors().values():
            factor.normal_()
    for key, factor in list(adapter.factor_tensors().items()):
        wrong = nn.Parameter(torch.randn(factor.shape[0] + 1, *factor.shape[1:]))
        kept = _replace(adapter, key, wrong)
        state = {k: v.clone() for k, v in lnn.adapter_state_dict(model).items()}
        calls = [lambda: lnn.merge(model), adapter.merge, adapter.delta_weight,
                 functools.partial(lnn.swap_adapter, model, state)]  # fmt: skip
        if groups == 1:
            calls.append(adapter.factors)
        for call in calls:
            before = snapshot(model)
            with pytest.raises(ShapeError, match=rf"factor '{key}' has shape"):
                call()
            same(before, snapshot(model))
        _replace(adapter, key, kept)


class AdapterMachine(RuleBasedStateMachine):
    """The model, and what each adapter should hold (`Expected`)."""

    @initialize(
        dtype=st.sampled_from(sorted(DTYPES)),
        conv_form=st.sampled_from(["lora", "centre_tap", "tucker2", "cp"]),
        groups=st.sampled_from([1, 2]),
        lin_mode=st.sampled_from(["plain", "fused", "dora", "trainable", "hard"]),
        conv_dora=st.booleans(),
        c1d_dora=st.booleans(),
        alpha=st.sampled_from([1.0, 3.0, 8.0]),
        rslora=st.booleans(),
        seed=st.integers(0, 2**16),
        padding_idx=st.sampled_from([None, 0, 3]),
        padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
        stride=st.sampled_from([1, 2]),
        wide_factors=st.booleans(),
        pissa=st.booleans(),
        emb_hard=st.booleans(),
    )
    def build(self, dtype, conv_form, groups, lin_mode, conv_dora, c1d_dora, alpha, rslora,
              seed, padding_idx, padding_mode, stride, wide_factors, pissa, emb_hard):  # fmt: skip
        if conv_form == "centre_tap":
            groups, stride = 1, 1
        conv_dora = conv_dora and conv_form == "lora" and groups == 1
        wide = wide_factors and DTYPES[dtype] != torch.float32
        if wide and lin_mode == "fused":
            lin_mode = "plain"  # fused runs one dtype
        pissa = pissa and lin_mode != "dora"
        self.geometry = {"padding_idx": padding_idx, "padding_mode": padding_mode,
                         "stride": stride}  # fmt: skip
        self.dtype, self.groups = DTYPES[dtype], groups
        self.forms = {"emb": "lora", "lin": "lora", "conv": conv_form, "c1d": "lora"}
        self.dora = {"emb": False, "lin": lin_mode == "dora", "conv": conv_dora, "c1d": c1d_dora}
        torch.manual_seed(seed)
        self.model = Net(groups, **self.geometry).to(self.dtype)
        targets = {
            "emb": {"r": 2, "hard": emb_hard},
            "lin": {"r": 2, "fused": lin_mode == "fused", "dora": lin_mode == "dora",
                    "trainable_scale": lin_mode == "trainable", "hard": lin_mode == "hard",
                    "init": "pissa" if pissa else "default"},
            "conv": {"r": [2, 2] if conv_form == "tucker2" else 2, "form": conv_form,
                     "dora": conv_dora},
            "c1d": {"r": 3, "dora": c1d_dora},
        }  # fmt: skip
        extra = {"factor_dtype": torch.float32} if wide else {}
        self.config = {"targets": targets, "alpha": alpha, "rslora": rslora, **extra}
        names = lnn.inject(self.model, targets, alpha=alpha, rslora=rslora, **extra)
        assert sorted(names) == sorted(NAMES)
        self.adapters = lnn.adapters(self.model)
        self.generator = torch.Generator().manual_seed(seed)
        self.x = inputs(self.dtype)
        self.keys = set(self.model.state_dict())
        self.norm_weight = self.model.norm.weight.detach().clone()
        self.biases = {n: (None if a.bias is None else a.bias.detach().clone())
                       for n, a in self.adapters.items()}  # fmt: skip
        self.expected = {}
        for name, adapter in self.adapters.items():
            trainable = isinstance(adapter.scale, nn.Parameter)
            weight = adapter.base.weight.detach()
            self.expected[name] = Expected(
                {}, None if trainable else float(adapter.scale), weight.double(), weight.clone()
            )
            self.expected[name].flags = {k: True for k in adapter.adapter_tensors()}
        # nonzero factors, so that every ΔW shows
        self._write_factors(self.random_state())
        self.snapshots: list[tuple[dict, dict, bool]] = []
        self.residual = pissa
        self.context = contextlib.ExitStack()
        self.reusing = False
        assert self.adapters["lin"].residual == pissa

    # --- helpers -----------------------------------------------------------------------

    def adapted(self, targets: dict, **settings: object) -> nn.Module:
        """A new model of this geometry and dtype, injected with `targets` and `settings`."""
        model = Net(self.groups, **self.geometry).to(self.dtype)
        lnn.inject(model, targets, **settings)
        return model

    def random_state(self, spread: float = 0.4) -> dict[str, torch.Tensor]:
        """A valid adapter state dict of random factors (a magnitude near the norms)."""
        state = {}
        for key, value in lnn.adapter_state_dict(self.model).items():
            if key.endswith(".residual"):  # a PiSSA start's flag
                state[key] = value.clone()
                continue
            noise = torch.randn(value.shape, generator=self.generator, dtype=torch.float64)
            if key.endswith("magnitude"):
                noise = value.double() * (1 + 0.2 * noise.abs())
            elif key.endswith("scale"):
                noise = 0.5 + noise.abs()
            else:
                noise = spread * noise
            state[key] = noise.to(value.dtype)
        return state

    def _write_factors(self, state: dict[str, torch.Tensor]) -> None:
        """Set the factors by hand (as a training step does) and record them."""
        with torch.no_grad():
            for key, value in state.items():
                name, local = key.split(".", 1)
                if local == "residual":
                    continue
                self.adapters[name].adapter_tensors()[local].copy_(value)
                self.expected[name].factors[local] = value.clone()

    def _record_loaded(self, state: dict[str, torch.Tensor], merge_all: bool, exact: bool) -> None:
        for name, expected in self.expected.items():
            given = {k.split(".", 1)[1]: v for k, v in state.items()
                     if k.split(".")[0] == name and not k.endswith(".residual")}  # fmt: skip
            if not given and not merge_all:
                continue
            expected.factors.update({k: v.clone() for k, v in given.items()})
            if expected.merged_with is None and merge_all:
                expected.exact = exact
                if not exact:
                    expected.bits = None
            elif expected.merged_with is not None and not expected.exact:
                expected.bits = None  # W − ΔW_old + ΔW_new: rounded
                self.bump(name, expected)
            if expected.merged_with is not None or merge_all:
                expected.merged_with = {k: v.clone() for k, v in expected.factors.items()}

    def refused(self, call, *errors: type[LowRankError]) -> LowRankError:
        """Run `call`, which must raise one of `errors` and change nothing."""
        before = snapshot(self.model)
        with pytest.raises(errors or LowRankError) as info:
            call()
        same(before, snapshot(self.model))
        return info.value

    def merged(self) -> list[str]:
        return [n for n, e in self.expected.items() if e.merged_with is not None]

    # --- operations --------------------------------------------------------------------

    @rule(exact=st.booleans())
    def merge_model(self, exact):
        held = lnn.merge(self.model, exact=exact)
        for expected in self.expected.values():
            if expected.merged_with is None:
                expected.merged_with = {k: v.clone() for k, v in expected.factors.items()}
                expected.exact = exact
        copies = [self.adapters[n].base.weight for n, e in self.expected.items() if e.exact]
        assert held == sum(w.numel() * w.element_size() for w in copies)

    @rule(name=st.sampled_from(NAMES), exact=st.booleans())
    def merge_one(self, name, exact):
        expected = self.expected[name]
        before = snapshot(self.model) if expected.merged_with is not None else None
        self.adapters[name].merge(exact=exact)
        if before is not None:
            same(before, snapshot(self.model))
        if expected.merged_with is None:  # a second merge is a no-op
            expected.merged_with = {k: v.clone() for k, v in expected.factors.items()}
            expected.exact = exact

    def bump(self, name: str, expected: Expected) -> None:
        """A subtracting unmerge: W comes back rounded in the dtype of `W + ΔW`, up to a few
        units in the last place of the larger of them."""
        merged = effective(name, self.forms[name], self.groups, self.dora[name], expected.weight,
                           expected.merged_with, expected.scale)  # fmt: skip
        size = float(merged.abs().max()) + float(expected.weight.abs().max())
        if self.dora[name]:  # W' n / m − ΔW: the ratio n / m scales the rounding of W'
            channels = layout(name, expected.weight)
            # a zero channel comes back exactly (its W kept aside by the merge)
            magnitude = expected.merged_with["magnitude"].double().abs()
            smallest = float(magnitude[magnitude > 0].min()) if magnitude.any() else 1.0
            norm = float(torch.linalg.vector_norm(channels.flatten(1), dim=1).max())
            size *= 1 + norm / smallest
        expected.drift += 4 * EPS[self.dtype] * size

    def _unmerged(self, name: str, expected: Expected) -> None:
        if expected.merged_with is not None and not expected.exact:
            expected.bits = None
            self.bump(name, expected)
        expected.merged_with, expected.exact = None, False

    def lost(self, names=NAMES) -> bool:
        """Whether one of `names` is a DoRA adapter loaded merged, which cannot unmerge."""
        return any(self.expected[n].lost for n in names)

    @rule()
    def unmerge_model(self):
        if self.lost():
            self.refused(lambda: lnn.unmerge(self.model), MergeError)
            return
        lnn.unmerge(self.model)
        for name, expected in self.expected.items():
            self._unmerged(name, expected)

    @rule(name=st.sampled_from(NAMES))
    def unmerge_one(self, name):
        if self.lost([name]):
            self.refused(self.adapters[name].unmerge, MergeError)
            return
        before = snapshot(self.model) if self.expected[name].merged_with is None else None
        self.adapters[name].unmerge()
        if before is not None:
            same(before, snapshot(self.model))
        self._unmerged(name, self.expected[name])

    @rule(name=st.sampled_from(NAMES))
    def train_step(self, name):
        """Factors change in place (an optimiser step), merged or not."""
        adapter = self.adapters[name]
        state = self.random_state(0.3)
        self._write_factors({k: v for k, v in state.items() if k.split(".")[0] == name})
        assert adapter.merged == (self.expected[name].merged_with is not None)

    @rule(strict=st.booleans(), keep=st.sets(st.sampled_from(NAMES), min_size=1))
    def load_adapter_state(self, strict, keep):
        state = self.random_state()
        if not strict:
            state = {k: v for k, v in state.items() if k.split(".")[0] in keep}
        if self.lost({k.split(".")[0] for k in state}):
            self.refused(lambda: lnn.load_adapter_state_dict(self.model, state, strict=strict),
                         MergeError)  # fmt: skip
            return
        lnn.load_adapter_state_dict(self.model, state, strict=strict)
        self._record_loaded(state, merge_all=False, exact=False)

    @rule(exact=st.booleans())
    def swap(self, exact):
        state = self.random_state()
        if self.lost():
            self.refused(lambda: lnn.swap_adapter(self.model, state, exact=exact), MergeError)
            return
        held = lnn.swap_adapter(self.model, state, exact=exact)
        self._record_loaded(state, merge_all=True, exact=exact)
        copies = [self.adapters[n].base.weight for n, e in self.expected.items() if e.exact]
        assert held == sum(w.numel() * w.element_size() for w in copies)

    @rule(roundtrip=st.sampled_from(["load", "swap"]))
    def reload_own_state(self, roundtrip):
        """The model's own adapter state (sharing its memory) loaded back."""
        state = lnn.adapter_state_dict(self.model)
        values = {k: v.clone() for k, v in state.items()}
        if self.lost():
            call = lnn.load_adapter_state_dict if roundtrip == "load" else lnn.swap_adapter
            self.refused(lambda: call(self.model, state), MergeError)
            return
        if roundtrip == "load":
            lnn.load_adapter_state_dict(self.model, state)
            self._record_loaded(values, merge_all=False, exact=False)
        else:
            lnn.swap_adapter(self.model, state)
            self._record_loaded(values, merge_all=True, exact=False)

    @rule(
        how=st.sampled_from(["nan", "inf", "shape", "extra", "missing", "int", "huge", "scalar"]),
        name=st.sampled_from(NAMES),
        swap=st.booleans(),
    )
    def bad_adapter_state(self, how, name, swap):
        state = self.random_state()
        key = next(k for k in state if k.startswith(name + "."))
        if how in ("nan", "inf"):
            state[key] = state[key].clone()
            state[key].view(-1)[0] = float(how)
        elif how == "shape":
            state[key] = torch.zeros(*state[key].shape, 2, dtype=state[key].dtype)
        elif how == "extra":
            state[name + ".lora_A"] = torch.zeros(2)
        elif how == "missing":
            del state[key]
        elif how == "int":
            state[key] = state[key].to(torch.int64)
        elif how == "huge":
            state[key] = torch.full_like(state[key], 1e39, dtype=torch.float64)
        else:
            state[key] = 3.0
        if how == "missing" and not swap:
            call = lambda: lnn.load_adapter_state_dict(self.model, state, strict=True)  # noqa: E731
        elif swap:
            call = lambda: lnn.swap_adapter(self.model, state)  # noqa: E731
        else:
            call = lambda: lnn.load_adapter_state_dict(self.model, state)  # noqa: E731
        self.refused(call)

    @rule(name=st.sampled_from(NAMES), value=st.sampled_from([float("nan"), float("inf")]),
          call=st.sampled_from(["merge", "merge_one", "merge_and_unload"]))  # fmt: skip
    def merge_non_finite_factor(self, name, value, call):
        """A factor turned NaN/Inf: merging is refused and leaves every weight as it was."""
        adapter = self.adapters[name]
        if adapter.merged:
            return
        factor = next(iter(adapter.factor_tensors().values()))
        kept = factor.detach().clone()
        with torch.no_grad():
            factor.view(-1)[0] = value
        try:
            run = {"merge": lambda: lnn.merge(self.model), "merge_one": adapter.merge,
                   "merge_and_unload": lambda: lnn.merge_and_unload(self.model)}[call]
            self.refused(run, NonFiniteError)
        finally:
            with torch.no_grad():
                factor.copy_(kept)

    @rule(requires_grad=st.booleans(), freeze_all_first=st.booleans())
    def requires_grad(self, requires_grad, freeze_all_first):
        if freeze_all_first:
            self.model.requires_grad_(False)
            for expected in self.expected.values():
                expected.flags = dict.fromkeys(expected.flags, False)
        lnn.set_requires_grad(self.model, requires_grad)
        for expected in self.expected.values():
            expected.flags = dict.fromkeys(expected.flags, requires_grad)

    @rule()
    def disabled(self):
        if any(self.merged()) or self.residual:
            self.refused(lambda: lnn.disable_adapters(self.model).__enter__(), MergeError)
            return
        with torch.no_grad(), lnn.disable_adapters(self.model):
            for name, adapter in self.adapters.items():
                got = adapter(self.x[name]).double()
                want = run_reference(name, adapter.base, self.expected[name].weight,
                                     self.x[name], self.groups)  # fmt: skip
                self.close(got, want, f"disabled {name}",
                           self.output_drift(name, self.expected[name]))  # fmt: skip

    @rule()
    def save_snapshot(self):
        state = copy.deepcopy(self.model.state_dict())
        record = {}
        for name, expected in self.expected.items():
            saved = expected.copy()
            if saved.merged_with is not None:  # saved with the factors it merged
                saved.factors = {k: v.clone() for k, v in saved.merged_with.items()}
            record[name] = saved
        self.snapshots.append((state, record, self.residual))

    @precondition(lambda self: self.snapshots)
    @rule(which=st.integers(0, 10))
    def load_snapshot(self, which):
        state, record, residual = self.snapshots[which % len(self.snapshots)]
        self.model.load_state_dict(copy.deepcopy(state))
        for name, saved in record.items():
            restored = saved.copy()
            restored.flags = self.expected[name].flags  # loading keeps requires_grad
            restored.exact = False  # the kept copy is not part of a state
            if restored.merged_with is not None:
                restored.bits = None
                restored.lost = self.dora[name]
            else:
                restored.bits = state[f"{name}.base.weight"].clone()
            self.expected[name] = restored
            bias = state.get(f"{name}.base.bias")
            self.biases[name] = None if bias is None else bias.clone()
        self.norm_weight = state["norm.weight"].clone()
        self.residual = residual
        assert self.adapters["lin"].residual == self.residual

    @precondition(lambda self: self.snapshots)
    @rule(which=st.integers(0, 10))
    def load_snapshot_into_a_fresh_model(self, which):
        state, record, _ = self.snapshots[which % len(self.snapshots)]
        fresh = self.adapted(**self.config)
        fresh.load_state_dict(copy.deepcopy(state))
        with torch.no_grad():
            for name, adapter in lnn.adapters(fresh).items():
                self.check_output(name, adapter, record[name], f"fresh {name}")
        if not any(self.dora.values()):  # a merged DoRA state keeps no norm to unmerge by
            lnn.unmerge(fresh)
            for name, adapter in lnn.adapters(fresh).items():
                expected = record[name].copy()
                self._unmerged(name, expected)
                self.close(adapter.base.weight, expected.weight, f"fresh unmerged {name}",
                           expected.drift)  # fmt: skip

    @rule(change=st.sampled_from(["rank", "form", "alpha", "dora", "trainable"]))
    def load_state_of_another_model(self, change):
        targets = copy.deepcopy(self.config["targets"])
        alpha = self.config["alpha"]
        if change == "rank":
            targets["c1d"]["r"] = 4
        elif change == "form":
            conv = targets["conv"]
            conv["form"], conv["r"], conv["dora"] = (
                ("cp", 2, False) if conv["form"] != "cp" else ("tucker2", [2, 2], False)
            )
            if self.forms["conv"] in ("lora", "centre_tap") and self.groups == 1:
                return  # LoRA factors alone may load into another form by design
        elif change == "alpha":
            alpha = alpha * 2
        elif change == "dora":
            targets["c1d"]["dora"] = not targets["c1d"]["dora"]
        else:
            lin = targets["lin"]
            if lin["dora"] or lin["fused"] or lin["trainable_scale"]:
                return  # a fixed scale's state loads into a trainable one by design
            targets["lin"]["trainable_scale"] = not targets["lin"]["trainable_scale"]
        other = self.adapted(**{**self.config, "targets": targets, "alpha": alpha})
        with torch.no_grad():
            for adapter in lnn.adapters(other).values():
                for t in adapter.factor_tensors().values():
                    t.normal_()
                if isinstance(adapter.scale, nn.Parameter):  # trained away from the fixed one
                    adapter.scale.fill_(0.77)
        if change == "dora":
            lnn.merge(other)  # a merged DoRA state into LoRA adapters, or the converse
        state = other.state_dict()
        self.refused(lambda: self.model.load_state_dict(state), StateDictError, ShapeError)
        if change in ("rank", "form"):
            adapter_state = lnn.adapter_state_dict(other)
            self.refused(lambda: lnn.load_adapter_state_dict(self.model, adapter_state))

    @rule(flip_start=st.booleans(), merged=st.booleans(), seed=st.integers(0, 99))
    def adopt_state_of_another_model(self, flip_start, merged, seed):
        """A whole state of another model of these settings (the other start for the linear
        layer, say) loads, and the model is then that one."""
        targets = copy.deepcopy(self.config["targets"])
        if flip_start and not self.dora["lin"]:
            targets["lin"]["init"] = "default" if self.residual else "pissa"
        torch.manual_seed(seed)
        other = self.adapted(**{**self.config, "targets": targets})
        record = {}
        with torch.no_grad():
            for name, adapter in lnn.adapters(other).items():
                for t in adapter.factor_tensors().values():
                    t.normal_(std=0.4)
                mine = self.expected[name]
                weight = adapter.base.weight.detach()
                record[name] = Expected(
                    {k: t.detach().clone() for k, t in adapter.adapter_tensors().items()},
                    mine.scale, weight.double(), weight.clone(), flags=mine.flags,
                )
        if merged:
            lnn.merge(other)
            for name, expected in record.items():
                expected.merged_with = {k: v.clone() for k, v in expected.factors.items()}
                expected.bits, expected.lost = None, self.dora[name]
        self.model.load_state_dict(copy.deepcopy(other.state_dict()))
        self.expected = record
        self.biases = {n: (None if a.bias is None else a.bias.detach().clone())
                       for n, a in lnn.adapters(other).items()}  # fmt: skip
        self.norm_weight = other.norm.weight.detach().clone()
        self.residual = lnn.adapters(other)["lin"].residual
        assert self.adapters["lin"].residual == self.residual

    @rule()
    def merge_and_unload_a_copy(self):
        model = copy.deepcopy(self.model)
        dense = lnn.merge_and_unload(model)
        assert not lnn.adapters(dense)
        assert isinstance(dense.c1d, Conv1D) and type(dense.lin) is nn.Linear
        with torch.no_grad():
            for name in NAMES:
                layer = getattr(dense, name)
                assert not layer.weight.requires_grad
                got = layer(self.x[name]).double()
                want = self.reference_output(name, self.expected[name])
                self.close(got, want, f"merge_and_unload {name}",
                           self.output_drift(name, self.expected[name]))  # fmt: skip

    @rule()
    def unload_a_copy(self):
        model = copy.deepcopy(self.model)
        if self.lost() or self.residual:
            with pytest.raises(MergeError):
                lnn.unload(model)
            return
        plain = lnn.unload(model)
        assert not lnn.adapters(plain)
        with torch.no_grad():
            for name in NAMES:
                layer = getattr(plain, name)
                expected = self.expected[name].copy()
                self._unmerged(name, expected)  # as unload unmerges it
                self.close(layer.weight, expected.weight, f"unload {name}", expected.drift)
                if not expected.drift:
                    got = layer(self.x[name]).double()
                    want = run_reference(name, layer, expected.weight, self.x[name],
                                         self.groups)  # fmt: skip
                    self.close(got, want, f"unload {name}")
                expected = self.expected[name]
                bits = expected.bits
                if bits is not None and (expected.merged_with is None or expected.exact):
                    assert torch.equal(layer.weight, bits), name

    @rule(name=st.sampled_from(NAMES))
    def backward(self, name):
        """Gradients of the factors against float64 autograd of the reference."""
        adapter, expected = self.adapters[name], self.expected[name]
        for t in adapter.parameters():
            t.grad = None
        out = adapter(self.x[name])
        probe = torch.randn(out.shape, generator=self.generator, dtype=torch.float64)
        if out.requires_grad:  # not where merged, or every tensor frozen
            (out.double() * probe).sum().backward()
        if expected.merged_with is not None:
            for key, t in adapter.adapter_tensors().items():
                assert t.grad is None, key
            return
        factors = {k: v.double().requires_grad_(expected.flags[k])
                   for k, v in expected.factors.items()}  # fmt: skip
        weight = self._reference_weight(name, expected, factors)
        want = run_reference(name, adapter.base, weight, self.x[name], self.groups)
        if any(f.requires_grad for f in factors.values()):
            (want * probe).sum().backward()
        for key, t in adapter.adapter_tensors().items():
            if not expected.flags[key]:
                assert t.grad is None, key
                continue
            if name == "emb" and key == "up" and adapter.padding_idx is not None:
                continue  # the branch passes `up` a gradient from the padding row, as PEFT's
            reference = factors[key].grad
            scale = float(reference.abs().max()) + 1e-6
            tolerance = 20 * TOLERANCE[self.dtype] * scale
            assert t.grad is not None, key
            err = float((t.grad.double() - reference).abs().max())
            assert err <= tolerance, (name, key, err, tolerance)
            t.grad = None

    @rule(case=st.sampled_from(["adapted", "inside", "norm", "missing", "rank", "alpha"]))
    def bad_inject(self, case):
        """A second inject that cannot be: refused, the model as it was."""
        targets, settings = {
            "adapted": (["lin"], {"rank": 2}),
            "inside": (["lin.base"], {"rank": 2}),
            "norm": (["norm"], {"rank": 2}),
            "missing": (["nothing"], {"rank": 2}),
            "rank": (["norm"], {"rank": 0}),
            "alpha": (["lin"], {"rank": 2, "alpha": float("nan")}),
        }[case]
        self.refused(lambda: lnn.inject(self.model, targets, **settings))

    @rule(name=st.sampled_from(NAMES), swap=st.booleans())
    def zero_magnitude(self, name, swap):
        """A DoRA magnitude with a zero channel: that channel is the bias alone, and its W
        comes back from a merge exactly."""
        if not self.dora[name] or self.lost():
            return
        state = self.random_state()
        state[f"{name}.magnitude"][0] = 0.0
        if swap:
            lnn.swap_adapter(self.model, state)
        else:
            lnn.load_adapter_state_dict(self.model, state)
        self._record_loaded(state, merge_all=swap, exact=False)

    @rule(name=st.sampled_from(NAMES), data=st.data())
    def load_some_keys(self, name, data):
        """Some of one adapter's tensors alone (`strict=False`)."""
        state = {k: v for k, v in self.random_state().items() if k.split(".")[0] == name}
        keys = data.draw(st.sets(st.sampled_from(sorted(state)), min_size=1))
        state = {k: state[k] for k in keys}
        if self.lost([name]):
            self.refused(lambda: lnn.load_adapter_state_dict(self.model, state, strict=False),
                         MergeError)  # fmt: skip
            return
        if self.residual and name == "lin" and "lin.residual" not in state:
            if len(state):
                self.refused(lambda: lnn.load_adapter_state_dict(self.model, state, strict=False),
                             StateDictError)  # fmt: skip
            return
        lnn.load_adapter_state_dict(self.model, state, strict=False)
        self._record_loaded(state, merge_all=False, exact=False)

    @rule(name=st.sampled_from(NAMES), data=st.data(),
          call=st.sampled_from(["merge", "merge_one", "swap", "unmerge", "state"]))  # fmt: skip
    def factor_of_another_shape(self, name, data, call):
        """A factor replaced by one of another shape: merges and swaps refuse it by name."""
        adapter = self.adapters[name]
        key = data.draw(st.sampled_from(sorted(adapter.factor_tensors())))
        kept = adapter.factor_tensors()[key]
        axis = data.draw(st.integers(0, kept.ndim - 1))
        shape = list(kept.shape)
        shape[axis] += 1
        kept = _replace(adapter, key, nn.Parameter(torch.zeros(shape, dtype=kept.dtype)))
        try:
            if call == "merge":
                if adapter.merged:
                    return
                self.refused(lambda: lnn.merge(self.model), ShapeError, MergeError)
            elif call == "merge_one":
                if adapter.merged:
                    return
                self.refused(adapter.merge, ShapeError)
            elif call == "swap":
                state = self.random_state()
                self.refused(lambda: lnn.swap_adapter(self.model, state), ShapeError, MergeError)
            elif call == "unmerge":
                # an unmerge takes out the factors it merged, kept aside
                if not adapter.merged or self.lost([name]):
                    return
                adapter.unmerge()
                self._unmerged(name, self.expected[name])
            else:
                state = {**self.model.state_dict(), f"{name}.{key}": torch.zeros(2)}
                self.refused(lambda: self.model.load_state_dict(state), ShapeError)
        finally:
            _replace(adapter, key, kept)

    @precondition(lambda self: self.dtype == torch.float16)
    @rule(name=st.sampled_from(NAMES), swap=st.booleans())
    def overflowing_update(self, name, swap):
        """Factors finite in float16 whose W + ΔW is not: a merge of them is refused."""
        if self.dora[name]:
            return  # m ⊙ (W + ΔW) / ‖W + ΔW‖ stays finite
        state = self.random_state()
        for key in state:
            if key.startswith(name + ".") and not key.endswith(("scale", "residual")):
                state[key] = torch.full_like(state[key], 400.0)
        if swap:
            self.refused(lambda: lnn.swap_adapter(self.model, state), NonFiniteError, MergeError)
        elif self.adapters[name].merged:
            self.refused(lambda: lnn.load_adapter_state_dict(self.model, state),
                         NonFiniteError, MergeError)  # fmt: skip

    @rule(name=st.sampled_from(NAMES))
    def reset_parameters(self, name):
        adapter, expected = self.adapters[name], self.expected[name]
        if expected.merged_with is not None or (self.residual and name == "lin"):
            self.refused(adapter.reset_parameters, MergeError)
            return
        adapter.reset_parameters()
        zero = adapter.variant.output
        assert not adapter.factor_tensors()[zero].any()
        with torch.no_grad():
            for key, t in adapter.adapter_tensors().items():
                expected.factors[key] = t.detach().clone()
        if self.dora[name]:  # ‖W‖ of the base
            channels = layout(name, expected.weight)
            norm = torch.linalg.vector_norm(channels.flatten(1), dim=1)
            self.close(adapter.magnitude, norm, f"{name} magnitude reset")
        if "scale" in expected.factors:
            scale = expected.factors["scale"]
            assert float(scale) == float(torch.tensor(adapter.config.resolved_scale(),
                                                      dtype=scale.dtype))  # fmt: skip

    @rule(dtype=st.sampled_from([torch.float64, torch.float32]))
    def converted_copy(self, dtype):
        """A copy converted to another dtype computes the same, and unmerges to W."""
        model = copy.deepcopy(self.model).to(dtype)
        with torch.no_grad():
            for name, adapter in lnn.adapters(model).items():
                x = self.x[name]
                got = adapter(x.to(dtype) if x.is_floating_point() else x).double()
                self.close(got, self.reference_output(name, self.expected[name]), f"{dtype} {name}")
        if self.lost():
            return
        lnn.unmerge(model)
        for name, adapter in lnn.adapters(model).items():
            expected = self.expected[name].copy()
            self._unmerged(name, expected)
            self.close(adapter.base.weight, expected.weight, f"{dtype} unmerged {name}",
                       expected.drift)  # fmt: skip

    @precondition(lambda self: not self.reusing)
    @rule()
    def reuse_dora_factors(self):
        """From here on, DoRA adapters reuse their factor between no-grad forwards."""
        self.context.enter_context(lnn.reuse_dora_factors(self.model))
        self.reusing = True

    def teardown(self):
        if hasattr(self, "context"):
            self.context.close()

    # --- checks ------------------------------------------------------------------------

    def close(self, got: torch.Tensor, want: torch.Tensor, what: str, drift: float = 0.0) -> None:
        scale = float(want.abs().max()) + 1e-6
        err = float((got.detach().double() - want).abs().max())
        assert err <= TOLERANCE[self.dtype] * scale * 4 + drift, (what, err, scale, drift)

    def _reference_weight(self, name: str, expected: Expected, factors: dict) -> torch.Tensor:
        """The effective weight: DoRA's norm taken without gradient, as the paper's."""
        if not self.dora[name]:
            return effective(name, self.forms[name], self.groups, False, expected.weight,
                             factors, expected.scale)  # fmt: skip
        s = factors["scale"].reshape(()) if expected.scale is None else expected.scale
        delta = layout(name, s * reference_delta(name, self.forms[name], self.groups, factors))
        channels = layout(name, expected.weight + delta)
        norm = torch.linalg.vector_norm(channels.detach().flatten(1), dim=1)
        shape = (-1,) + (1,) * (channels.ndim - 1)
        return layout(name, channels * (factors["magnitude"] / norm).reshape(shape))

    def expected_weight(self, name: str, expected: Expected) -> torch.Tensor:
        """The effective weight as the adapter's `weight` shows it."""
        if expected.merged_with is not None:
            return effective(name, self.forms[name], self.groups, self.dora[name],
                             expected.weight, expected.merged_with, expected.scale)  # fmt: skip
        return effective(name, self.forms[name], self.groups, self.dora[name], expected.weight,
                         expected.factors, expected.scale)  # fmt: skip

    def reference_output(self, name: str, expected: Expected) -> torch.Tensor:
        factors = expected.merged_with if expected.merged_with is not None else expected.factors
        weight = effective(name, self.forms[name], self.groups, self.dora[name],
                           expected.weight, factors, expected.scale)  # fmt: skip
        return run_reference(name, self.adapters[name].base, weight, self.x[name], self.groups)

    def check_output(self, name, adapter, expected, what):
        got = adapter(self.x[name]).double()
        factors = expected.merged_with if expected.merged_with is not None else expected.factors
        weight = effective(name, self.forms[name], self.groups, self.dora[name],
                           expected.weight, factors, expected.scale)  # fmt: skip
        want = run_reference(name, adapter.base, weight, self.x[name], self.groups)
        self.close(got, want, what, self.output_drift(name, expected))

    def output_drift(self, name: str, expected: Expected) -> float:
        """How far a drifted W may move an output: each output sums `fan_in` inputs."""
        if not expected.drift:
            return 0.0
        x = self.x[name]
        if name == "emb":
            return expected.drift
        fan_in = layout(name, expected.weight)[0].numel()
        return expected.drift * fan_in * float(x.abs().max())

    @invariant()
    def matches_the_reference(self):
        if not hasattr(self, "model"):
            return
        assert set(self.model.state_dict()) == self.keys
        assert torch.equal(self.model.norm.weight, self.norm_weight)
        assert not self.model.norm.weight.requires_grad
        with torch.no_grad():
            for name, adapter in self.adapters.items():
                expected = self.expected[name]
                assert getattr(self.model, name) is adapter
                assert adapter.merged == (expected.merged_with is not None), name
                assert (adapter.base_copy is not None) == expected.exact, name
                for key, t in adapter.adapter_tensors().items():
                    assert torch.equal(t, expected.factors[key]), (name, key)
                    assert t.requires_grad == expected.flags[key], (name, key)
                assert not any(p.requires_grad for p in adapter.base.parameters()), name
                bias = adapter.bias
                assert (bias is None) == (self.biases[name] is None)
                assert bias is None or torch.equal(bias, self.biases[name]), name
                weight = adapter.base.weight
                if expected.merged_with is None:
                    if expected.bits is not None:
                        assert torch.equal(weight, expected.bits), f"{name}: W not bit-exact"
                    self.close(weight, expected.weight, f"{name} unmerged weight", expected.drift)
                else:
                    want = self.expected_weight(name, expected)
                    self.close(weight, want, f"{name} merged weight", expected.drift)
                    if expected.exact and expected.bits is not None:
                        assert torch.equal(adapter.base_copy, expected.bits), name
                self.check_output(name, adapter, expected, f"output {name}")
                current = self.expected_weight(name, expected)
                self.close(adapter.weight, current, f"{name}.weight", expected.drift)


TestAdapterMachine, _long = machine_tests(AdapterMachine, 8, 10, 40)
test_adapter_machine_long_sequences = pytest.mark.exhaustive(_long)
