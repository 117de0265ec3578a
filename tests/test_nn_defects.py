"""lowrank.nn off the happy path: each test here reproduces a silent wrong result (or a crash
later) of the earlier adapter modules, found on ordinary models, and checks what happens now.

Only names the earlier `lowrank.nn` had are imported at module level, so that every test here
runs (and fails) against it."""

from __future__ import annotations

import copy
import itertools
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from model_factories import TinyNet
from test_recompose_range import assert_gradient_rounded_once
from torch import nn
from torch.nn.utils import parametrize, prune

from lowrank import LowRankError, MergeError, NonFiniteError, TargetError
from lowrank import nn as lnn
from lowrank.errors import StateDictError
from lowrank.io import model_adapter
from lowrank.nn import LoRALinear, inject

pytestmark = pytest.mark.long  # among the suite's longest modules: scheduled first


def randomise(module: nn.Module, seed: int = 0) -> None:
    """Random values in every trainable parameter (adapter factors), from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def factors64(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return adapter.down.detach().double(), adapter.up.detach().double()


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}


def structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules(remove_duplicate=False)]


def mlp64(model: nn.Module, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`Linear → ReLU → Linear` with each layer's `W + scale · up @ down`, in float64 from the
    adapters' tensors (`model[0]`, `model[2]` hold LoRA adapters)."""
    with torch.no_grad():
        w0, w2 = (m.base.weight.double() + scale * m.up.double() @ m.down.double()
                  for m in (model[0], model[2]))  # fmt: skip
        hidden = F.relu(x.double() @ w0.T + model[0].base.bias.double())
        return hidden @ w2.T + model[2].base.bias.double()


# -- merge() never writes a non-finite weight -------------------------------------------------


@pytest.mark.parametrize("case", ["nan_factor", "fp16_overflow"])
def test_merge_refuses_a_non_finite_result_and_leaves_the_weight(case):
    dtype = torch.float16 if case == "fp16_overflow" else torch.float32
    base = nn.Linear(6, 5, dtype=dtype)
    adapter = LoRALinear(base, 2, scale=1.0)
    with torch.no_grad():
        if case == "nan_factor":
            randomise(adapter)
            adapter.up[1, 0] = float("nan")
        else:  # ΔW = 2 · 300 · 300 = 180000 > 65504, the largest float16
            adapter.down.fill_(300.0)
            adapter.up.fill_(300.0)
    before = base.weight.detach().clone()
    with pytest.raises(NonFiniteError, match=r"ΔW|overflow"):
        adapter.merge()
    assert torch.equal(base.weight, before)
    assert not adapter.merged


def test_merge_computes_delta_in_float32_where_float16_would_overflow_midway():
    """ΔW alone overflows float16 (70000) but W + ΔW (10000) does not: the merge is exact to
    float16 rounding of the float64 sum."""
    base = nn.Linear(1, 1, bias=False, dtype=torch.float16)
    adapter = LoRALinear(base, 1, scale=1.0)
    with torch.no_grad():
        base.weight.fill_(-60000.0)
        adapter.down.fill_(250.0)
        adapter.up.fill_(280.0)
    adapter.merge()
    assert base.weight.item() == 10000.0
    adapter.unmerge()
    assert base.weight.item() == -60000.0


# -- the merged state is part of the saved state ----------------------------------------------


def test_merged_state_dict_loads_into_a_fresh_model_without_applying_delta_twice():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    original = copy.deepcopy(model)
    inject(model, ["0", "2"], rank=2)
    randomise(model)
    x = torch.randn(4, 6)
    expected = model(x).detach()
    model[0].merge()
    model[2].merge()
    fresh = copy.deepcopy(original)
    inject(fresh, ["0", "2"], rank=2)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    fresh[0].unmerge()
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fresh[0].base.weight, original[0].weight, rtol=1e-5, atol=1e-6)


# -- shared modules and tied weights ----------------------------------------------------------


class SharedTwice(nn.Module):
    """One `nn.Linear` registered as both `first` and `second`, applied twice."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(4, 4, dtype=torch.float64)
        self.first = shared
        self.second = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_a_module_registered_twice_is_adapted_under_both_names():
    model = SharedTwice()
    weight, bias = model.first.weight.detach().clone(), model.first.bias.detach().clone()
    names = inject(model, "second", rank=2)
    assert names == ["first", "second"]
    assert model.first is model.second
    randomise(model)
    down, up = factors64(model.first)
    merged = weight + up @ down
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = F.linear(torch.tanh(F.linear(x, merged, bias)), merged, bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


class TiedLM(nn.Module):
    """An embedding and an output head that share one weight (a tied LM head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def test_merging_into_a_tied_weight_is_refused_and_changes_no_other_module():
    model = TiedLM()
    inject(model, "head", rank=2)
    randomise(model)
    ids = torch.tensor([[1, 2, 3]])
    embedded = model.embed(ids).detach().clone()
    logits = model(ids).detach().clone()
    with pytest.raises(LowRankError, match="embed"):
        model.head.merge()
    assert torch.equal(model.embed(ids), embedded)
    assert torch.equal(model(ids), logits)


def test_a_merged_state_into_a_tied_base_is_refused_and_changes_no_other_module():
    """Found by the model state machine: a merged state saved from an untied model and
    loaded into a tied one wrote W + ΔW into the embedding too (its rows off by ~1.5 here,
    the logits by ~3), the adapter flagged merged; a merge there is refused, and so is this
    load, nothing written."""
    source = TiedLM()
    source.head.weight = nn.Parameter(source.embed.weight.detach().clone())  # untied
    target = copy.deepcopy(source)
    target.head.weight = target.embed.weight  # the same values, tied
    for model in (source, target):
        inject(model, "head", rank=2)
    randomise(source)
    lnn.merge(source)
    ids = torch.tensor([[1, 2, 3]])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(StateDictError, match=r"'head'.*merged.*'embed\.weight'.*tied"):
            target.load_state_dict(source.state_dict(), strict=strict)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
        assert not target.head.merged
    torch.testing.assert_close(target.embed(ids), source.embed(ids), rtol=0, atol=0)



def test_a_merged_state_looks_for_ties_once_per_load(monkeypatch):
    """Found in review: each adapter looked for ties of its base weight in a search of every
    live object, twice (the model's load hook and its own), whenever something else held
    the weight (an optimiser over all parameters, or the state itself: a model's own
    state loaded back): 5 s instead of 25 ms for a small Llama. Now one search per load,
    the ties still refused (above) and the load still equal to the state."""
    import gc

    from lowrank.nn import ties

    calls, live = [], gc.get_objects

    def counted():
        calls.append(1)
        return live()

    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(6)))
    inject(model, [str(i) for i in range(6)], rank=2)
    randomise(model)
    lnn.merge(model)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)  # holds every base weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    target = copy.deepcopy(model)
    monkeypatch.setattr(ties.gc, "get_objects", counted)
    for into, loaded in ((model, model.state_dict()), (target, state)):
        calls.clear()
        into.load_state_dict(loaded)
        assert len(calls) <= 1
        assert all(torch.equal(state[k], v) for k, v in into.state_dict().items())
    del optimiser

class TiedBody(nn.Module):
    """An LM whose body holds the embedding and whose head, outside the body, is tied to it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleDict({"embed": nn.Embedding(10, 6), "proj": nn.Linear(6, 6)})
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.body["embed"].weight


@pytest.mark.parametrize("call", ["merge", "merge_and_unload", "swap_adapter", "pissa"])
def test_a_part_of_a_model_never_merges_into_a_weight_tied_outside_it(call):
    """From the body alone the head's tie cannot be seen by walking modules: merging the
    body (or starting the body's embedding from PiSSA) wrote into the head's weight too
    (GPT-2's logits moved by 4.8). Ties found when the whole model was injected are kept,
    and ties to live modules outside the part are looked for."""
    torch.manual_seed(0)
    model = TiedBody()
    lazy = nn.LazyLinear(3)  # a live module the search meets, whose weight has no storage yet
    hidden = torch.randn(3, 6)
    head = model.head(hidden).detach().clone()
    with pytest.raises(LowRankError, match="outside the model"):
        if call == "pissa":
            inject(model.body, "embed", rank=2, init="pissa")
        else:
            inject(model, "body.embed", rank=2)
            randomise(model)
            state = lnn.adapter_state_dict(model)
            if call == "swap_adapter":
                getattr(lnn, call)(model.body, {k[5:]: v for k, v in state.items()})
            else:
                getattr(lnn, call)(model.body)
    assert torch.equal(model.head(hidden), head)
    embed = model.body["embed"]
    assert model.head.weight is getattr(embed, "base", embed).weight  # still tied
    if call == "merge":  # once untied, the body merges
        model.head.weight = nn.Parameter(model.head.weight.detach().clone())
        lnn.merge(model.body)
        assert model.body["embed"].merged and torch.equal(model.head(hidden), head)
    assert nn.parameter.is_lazy(lazy.weight)


def _shared_base(where: str) -> tuple[nn.Module, LoRALinear, nn.Module, object]:
    """A model whose first module is an adapter over `lin`, and `(model, adapter, reader,
    keep)`: `reader` is another module running `lin` (a second adapter or `lin` itself),
    inside the model or outside it (`keep` holds what lives outside)."""
    lin = nn.Linear(4, 4, dtype=torch.float64)
    adapter = LoRALinear(lin, 2)
    reader = LoRALinear(lin, 2) if where.startswith("adapter") else lin
    if where.endswith("inside"):
        return nn.Sequential(adapter, reader), adapter, reader, None
    keep = nn.Sequential(reader)
    return nn.Sequential(adapter), adapter, reader, keep


@pytest.mark.parametrize("fails", ["inject", "adapter"])
def test_a_failed_start_kept_by_its_traceback_leaves_no_second_runner(fails):
    """A REPL or a log keeps the exception of a failed `inject` (or adapter), and with it the
    adapters half built: they held the layers, and the next merge took them for second
    modules running those layers' weights."""
    from lowrank.forms import LoRA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    # a start from NaN factors fails once the adapter holds its layer
    bad = {"2": LoRA(torch.full((2, 8), float("nan")), torch.ones(4, 2))}
    with pytest.raises(NonFiniteError) as kept:
        if fails == "inject":
            inject(model, ["0", "2"], rank=2, factors=bad)
        else:
            LoRALinear(model[2], 2, factors=bad["2"])
    assert kept.value.__traceback__ is not None
    inject(model, ["0", "2"], rank=2)
    randomise(model)
    x = torch.randn(3, 8, dtype=torch.float64)
    want = model.double()(x).detach()
    lnn.merge(model)
    assert model[0].merged and model[2].merged
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call", ["merge", "adapter.merge", "merge_and_unload"])
@pytest.mark.parametrize(
    "where", ["adapter inside", "raw inside", "adapter outside", "raw outside"]
)
def test_a_base_another_module_runs_is_never_merged_into(where, call):
    """A base layer wrapped by a second adapter, or still registered raw elsewhere, is read
    by that other module too: merging wrote ΔW into the weight it runs, so its output
    moved (by ΔW x for a raw alias, and a second adapter's output became W + ΔW₁ + ΔW₂)."""
    model, adapter, reader, keep = _shared_base(where)
    randomise(model)
    randomise(reader, seed=1)
    x = torch.randn(3, 4, dtype=torch.float64)
    before = reader(x).detach().clone()
    weight = adapter.base.weight.detach().clone()
    with pytest.raises(MergeError, match="tied weights"):
        if call == "adapter.merge":
            adapter.merge()
        else:
            getattr(lnn, call)(model)
    assert torch.equal(reader(x), before)
    assert torch.equal(adapter.base.weight, weight) and not adapter.merged
    assert keep is None or keep[0] is reader


@pytest.mark.parametrize("form", ["lora", "centre_tap", "tucker2"])
def test_a_conv_adapter_compiles_whole_for_inference(form):
    """Without gradients a conv adapter weighs the weight-space path against the branch by
    its factors' counts; that count passed a generator to `math.prod`, which dynamo does
    not trace: `fullgraph=True` failed under `no_grad` (dynamo's tracing alone, the eager
    backend, shows it). Compiled output against sequential
    float64 convolutions of the factors."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    adapter = lnn.LoRAConv(nn.Conv2d(8, 6, 3, padding=1), rank=2, alpha=3.0, form=form)
    randomise(adapter)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        y = torch.compile(adapter, fullgraph=True, backend="eager")(x)
    wide = {name: p.detach().double() for name, p in adapter.named_parameters()}
    h = x.double()
    for name in ("down", "mid", "up"):
        if name in wide:
            spatial = wide[name].shape[-1] > 1
            h = F.conv2d(h, wide[name], padding=1 if spatial else 0)
    want = F.conv2d(x.double(), wide["base.weight"], wide["base.bias"], padding=1) + 1.5 * h
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


class HalfBuilt(nn.Module):
    def __init__(self) -> None:
        raise RuntimeError("fails before nn.Module.__init__")


def test_a_tie_by_shared_storage_outside_the_part_is_found_past_odd_live_modules():
    """`load_state_dict(assign=True)` of a tied checkpoint gives the head another Parameter
    over the embedding's memory: the body's merge wrote into the head. The search also
    passes modules that hold a sparse parameter or never finished `__init__`."""
    torch.manual_seed(0)
    model = TiedBody()
    model.head.weight = nn.Parameter(model.body["embed"].weight.detach())  # same storage
    sparse = nn.Module()
    sparse.register_parameter("weight", nn.Parameter(torch.eye(3).to_sparse()))
    half = HalfBuilt.__new__(HalfBuilt)
    inject(model.body, "embed", rank=2)
    randomise(model)
    hidden = torch.randn(3, 6)
    head = model.head(hidden).detach().clone()
    with pytest.raises(MergeError, match="weight of a Linear outside the model"):
        lnn.merge(model.body)
    assert torch.equal(model.head(hidden), head) and sparse and half
    later = TiedBody()
    later.head.weight = nn.Parameter(torch.randn(10, 6))
    inject(later.body, "embed", rank=2)
    randomise(later)
    later.head.weight = later.body["embed"].base.weight  # tied after inject
    with pytest.raises(MergeError, match="outside the model"):
        lnn.merge(later.body)


@pytest.mark.parametrize("layout", ["transposed", "slice"])
def test_a_tie_over_the_same_memory_in_another_layout_is_found(layout):
    """A decoder over the transpose of an encoder's weight, or a head over a slice of a
    table: the same bytes in another shape or place. A merge wrote into both (the other
    module's weight moved by 2.4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 6))
    first = model[0].weight
    view = first.detach().t() if layout == "transposed" else first.detach()[1:]
    if layout == "slice":
        model[1] = nn.Linear(6, 3)
    model[1].weight = nn.Parameter(view)
    inject(model, ["0"], rank=2)
    randomise(model)
    other = model[1].weight.detach().clone()
    with pytest.raises(MergeError, match=r"'1\.weight'"):
        lnn.merge(model)
    with pytest.raises(MergeError, match="outside the model"):
        lnn.merge(model[0])
    assert torch.equal(model[1].weight, other)


@pytest.mark.parametrize(
    ("views", "tied"),
    [
        (lambda w: [w[0::2], w[1::2]], False),  # even and odd rows: one range, no byte shared
        (lambda w: [c.t() for c in w.t().chunk(3)], False),  # a fused qkv weight split
        (lambda w: [w[0::2], w[2:4]], True),  # row 2 in both
        (lambda w: [w[0:3], w[1:1]], False),  # an empty weight holds no byte
    ],
    ids=["even-odd", "qkv-columns", "shared-row", "empty"],
)
def test_views_of_one_buffer_are_tied_only_where_they_share_a_byte(views, tied):
    """Weights taken as strided views of one buffer lie in overlapping byte ranges without
    sharing an element: they were taken for tied weights and every merge was refused."""
    buffer = torch.randn(6, 6)
    weights = views(buffer)
    model = nn.Sequential(*(nn.Linear(w.shape[1], w.shape[0]) for w in weights))
    for layer, view in zip(model, weights, strict=True):
        layer.weight = nn.Parameter(view)
    inject(model, [str(i) for i, w in enumerate(weights) if w.numel()], rank=1)
    randomise(model)
    if tied:
        with pytest.raises(MergeError, match="tied weights"):
            lnn.merge(model)
    else:
        lnn.merge(model)
        assert all(a.merged for a in lnn.adapters(model).values())


def test_only_a_weight_something_else_holds_is_looked_for_outside_the_model(monkeypatch):
    """The search for ties outside the model passes over every live object: a plain inject,
    merge and swap do not run it, an optimiser built first (holding the weights) does."""
    import gc

    scans = []
    every = gc.get_objects
    monkeypatch.setattr(gc, "get_objects", lambda *a: scans.append(1) or every(*a))
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(3, 3, 3), nn.Embedding(5, 4))
    inject(model, ["0", "1", "2"], rank=2)
    lnn.merge(model)
    lnn.swap_adapter(model, lnn.adapter_state_dict(model))
    assert scans == []
    held = nn.Sequential(nn.Linear(4, 4))
    optimiser = torch.optim.SGD(held.parameters(), lr=0.1)
    inject(held, ["0"], rank=2)
    assert scans == [1] and held[0].shares_weight_with == () and optimiser


@pytest.mark.parametrize("tie", ["data", "parameters dict", "set_", "setattr"])
def test_a_tie_made_after_a_merge_is_found_at_the_next_write(tie):
    """Between writes the weight can be tied without registering a parameter (`.data =`,
    `set_`, a `_parameters` entry as accelerate sets it) while the reference counts come
    back to what they were (a state dict kept over the old memory): every write looks for
    ties again."""
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 4, bias=False)
    inject(body, ["0"], rank=2)
    randomise(body)
    kept, held = body.state_dict(), [body[0].base.weight]  # a state dict, an optimiser
    lnn.merge(body)
    state = {key: 3 * value for key, value in lnn.adapter_state_dict(body).items()}
    lnn.swap_adapter(body, state)
    if tie == "data":  # the weight moves to the head's memory; kept holds the old
        body[0].base.weight.data = head.weight.data
    elif tie == "parameters dict":  # the head takes the place of the list's reference
        held.clear()
        head._parameters["weight"] = body[0].base.weight
    elif tie == "set_":  # the head's parameter takes the place of the state dict's tensor
        del kept
        with torch.no_grad():
            head.weight.set_(body[0].base.weight.detach())
    else:
        head.weight = body[0].base.weight
    x = torch.randn(2, 4)
    before = head(x).detach().clone()
    with pytest.raises(MergeError, match="weight of a Linear outside the model"):
        lnn.swap_adapter(body, {key: 2 * value for key, value in state.items()})
    assert torch.equal(head(x), before)


def test_an_adapters_own_merge_looks_for_ties_made_since_inject():
    """`adapter.merge()` used the ties `inject` found: a weight tied afterwards (here inside
    the model) was written through, and the other layer's output moved by 3.0. Both ties
    are named now, and nothing is written."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    inject(model, ["0"], rank=2)
    randomise(model)
    model[1].weight = model[0].base.weight
    x = torch.randn(2, 4)
    before = model[1](x).detach().clone()
    with pytest.raises(MergeError, match=r"'2\.weight'.*weight of a Linear outside the adapter"):
        model[0].merge()
    assert torch.equal(model[1](x), before) and not model[0].merged
    for layer in (1, 2):  # untied, both: the adapter merges (no stale refusal)
        model[layer].weight = nn.Parameter(model[layer].weight.detach().clone())
    model[0].merge()
    assert model[0].merged and torch.equal(model[1](x), before)


def test_an_adapters_own_merge_keeps_a_tie_no_count_shows():
    """Two parameters made with `torch.from_numpy` over one array share memory through two
    storages, so no reference count shows the tie `inject` recorded; `adapter.merge()`
    dropped it and wrote into the other layer (its output moved by 1.8)."""
    array = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    for layer in model:
        layer.weight = nn.Parameter(torch.from_numpy(array))
    inject(model, ["0"], rank=2)
    randomise(model)
    x = torch.randn(2, 4)
    before = model[1](x).detach().clone()
    with pytest.raises(MergeError, match=r"'1\.weight'"):
        model[0].merge()
    assert torch.equal(model[1](x), before) and not model[0].merged


def test_inject_and_unload_walk_the_model_a_fixed_number_of_times(monkeypatch):
    """Each adapter's parents were found by a walk over the whole model: inject,
    merge_and_unload and unload took time in the square of the model's size (3.3 s for 384
    adapters of a 96-layer GPT-2, against PEFT's 1.9 s). The walks no longer grow with the
    adapters."""
    walks = []
    named = nn.Module.named_modules

    def counted(self, *args, **kwargs):
        walks.append(self)
        return named(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counted)
    counts = []
    for depth in (2, 12):
        model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(depth)))
        walks.clear()
        inject(model, "all-linear", rank=1)
        lnn.merge_and_unload(model)
        inject(model, "all-linear", rank=1)
        lnn.unload(model)
        counts.append(sum(walk is model for walk in walks))
    assert counts[0] == counts[1], counts


# -- weights behind a parametrization or a weight_norm hook -----------------------------------


class Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def computed_weight_layer(kind: str) -> nn.Linear:
    base = nn.Linear(5, 4)
    if kind == "parametrize":
        parametrize.register_parametrization(base, "weight", Doubled())
    elif kind == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            base = nn.utils.weight_norm(base)
    else:
        base = nn.utils.parametrizations.weight_norm(base)
    return base


@pytest.mark.parametrize("kind", ["parametrize", "weight_norm", "parametrizations.weight_norm"])
def test_merge_into_a_computed_weight_is_refused_before_anything_changes(kind):
    torch.manual_seed(0)
    base = computed_weight_layer(kind)
    adapter = LoRALinear(base, 2)
    randomise(adapter)
    x = torch.randn(3, 5)
    expected = adapter(x).detach()
    state = copy.deepcopy(base.state_dict())
    with pytest.raises(LowRankError, match="weight"):
        adapter.merge()
    assert not adapter.merged
    assert all(torch.equal(state[key], value) for key, value in base.state_dict().items())
    torch.testing.assert_close(adapter(x), expected, rtol=0, atol=0)


def _compute_the_weight(base: nn.Linear, kind: str) -> None:
    """Make `base.weight` computed in place, keeping its value where the kind allows."""
    if kind == "prune":
        prune.identity(base, "weight")
    elif kind == "parametrize":
        parametrize.register_parametrization(base, "weight", nn.Identity())
    elif kind == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(base)
    else:
        nn.utils.parametrizations.weight_norm(base)


@pytest.mark.parametrize("kind", ["prune", "parametrize", "weight_norm", "parametrizations"])
@pytest.mark.parametrize("how", ["adapter", "model", "unload"])
@pytest.mark.parametrize("exact", [False, True])
def test_unmerge_from_a_weight_computed_since_the_merge_is_refused(kind, how, exact):
    """A write of W − ΔW into a weight made computed after the merge would reach a temporary
    and leave W + ΔW stored while the branch runs again (ΔW twice); refused, nothing
    changed: the layer still computes W + ΔW, as float64 says."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, dtype=torch.float64))
    inject(model, "0", rank=2)
    adapter = model[0]
    randomise(adapter)
    x = torch.randn(3, 5, dtype=torch.float64)
    expected = x @ (adapter.base.weight + adapter.delta_weight()).t() + adapter.base.bias
    expected = expected.detach()
    lnn.merge(model, exact=exact)
    _compute_the_weight(adapter.base, kind)
    state = copy.deepcopy(adapter.base.state_dict())
    call = {"adapter": adapter.unmerge, "model": lambda: lnn.unmerge(model),
            "unload": lambda: lnn.unload(model)}[how]  # fmt: skip
    with pytest.raises(LowRankError, match=r"cannot unmerge .* since the merge"):
        call()
    assert adapter.merged and model[0] is adapter
    assert all(torch.equal(state[key], value) for key, value in adapter.base.state_dict().items())
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("kind", ["weight_norm", "old_weight_norm", "prune"])
def test_a_computed_factor_trains_and_is_refused_by_name_where_delta_w_is_read(kind):
    """A parametrization or pruning on an adapter's own factor: the forward and backward run
    it; merge, ΔW and an adapter file need the stored factors and are a `TargetError` naming
    the factor, nothing changed (no bare KeyError)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    inject(model, "0", rank=2)
    if kind == "weight_norm":
        nn.utils.parametrizations.weight_norm(model[0], name="up")
        factor = "up"
    elif kind == "old_weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(model[0], name="up")
        factor = "up"
    else:
        prune.l1_unstructured(model[0], "down", amount=0.5)
        factor = "down"
    model(torch.randn(3, 6)).sum().backward()
    weight = model[0].base.weight.detach().clone()
    swapped = {k: torch.zeros_like(v) for k, v in lnn.adapter_state_dict(model).items()}
    for call in (lambda: lnn.merge(model), model[0].delta_weight,
                 lambda: lnn.merge_and_unload(model), lambda: model_adapter(model),
                 lambda: lnn.swap_adapter(model, swapped)):  # fmt: skip
        with pytest.raises(TargetError, match=rf"factor\(s\) \['{factor}'\] are computed"):
            call()
    assert not model[0].merged and torch.equal(model[0].base.weight, weight)


def test_a_base_quantized_after_inject_is_refused_by_merge_with_nothing_changed():
    """`quantize_dynamic` swaps the base for a quantized Linear whose `weight` is a method:
    merges are a `MergeError` (no AttributeError), the model runs as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    inject(model, ["0", "2"], rank=4)
    with warnings.catch_warnings():  # torch's own: quantized tensors are deprecated
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 16)
    expected = quantized(x)
    for call in (lambda: lnn.merge(quantized), lambda: lnn.merge_and_unload(quantized)):
        with pytest.raises(MergeError, match="not a tensor"):
            call()
    assert not quantized[0].merged and torch.equal(quantized(x), expected)
    assert not hasattr(quantized[0], "weight")  # as a module without one: model walks skip it


def test_a_hard_adapter_whose_base_is_quantized_after_inject_is_refused_by_name():
    """A hard adapter runs its base with `W + ΔW` as the weight; a quantized base holds
    none: a `TargetError` naming it, not Python's AttributeError for `weight`."""
    model = nn.Sequential(nn.Linear(6, 5))
    inject(model, ["0"], rank=2, hard=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(TargetError, match=r"hard=True .* holds no weight tensor"):
        quantized(torch.randn(2, 6))


# -- repeated inject ---------------------------------------------------------------------------


def test_a_second_inject_keeps_the_first_adapters_trainable():
    model = TinyNet()
    inject(model, "to_q", rank=2)
    inject(model, "to_v", rank=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {f"blocks.{b}.attn.{t}.{f}" for b in (0, 1) for t in ("to_q", "to_v")
                for f in ("down", "up")}  # fmt: skip
    assert trainable == expected


def test_injecting_into_an_adapted_layer_is_a_clear_error_that_changes_nothing():
    model = TinyNet()
    inject(model, "to_q", rank=2)
    before, layout = flags(model), structure(model)
    with pytest.raises(TargetError, match="already has an adapter"):
        inject(model, ["to_v", "to_q"], rank=4)
    assert flags(model) == before and structure(model) == layout


# -- parents that read child.weight directly --------------------------------------------------


def mha_reference(mha: nn.MultiheadAttention, out_weight: torch.Tensor, x: torch.Tensor):
    """The attention output with `out_proj.weight` replaced, from a plain copy of `mha`."""
    plain = copy.deepcopy(mha)
    with torch.no_grad():
        plain.out_proj.weight.copy_(out_weight)
    return plain(x, x, x, need_weights=False)[0]


def test_multihead_attention_out_proj_adapter_runs_with_w_plus_delta():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True,
                                                          dtype=torch.float64)})  # fmt: skip
    original = copy.deepcopy(model.attn)
    inject(model, "out_proj", rank=2)
    randomise(model)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y = model.attn(x, x, x, need_weights=False)[0]
    down, up = factors64(model.attn.out_proj)
    expected = mha_reference(original, original.out_proj.weight.detach() + up @ down, x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    assert model.attn.out_proj.down.grad.abs().sum() > 0


def test_transformer_encoder_layer_fast_path_sees_the_adapted_weight():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    original = copy.deepcopy(layer)
    inject(layer, ["linear1", "out_proj"], rank=2)
    randomise(layer)
    layer.eval()
    original.eval()
    with torch.no_grad():
        for name in ("linear1", "self_attn.out_proj"):
            adapter = layer.get_submodule(name)
            down, up = factors64(adapter)
            delta = (up @ down).float()
            original.get_submodule(name).weight.add_(delta)
        x = torch.randn(2, 5, 8)
        torch.testing.assert_close(layer(x), original(x), rtol=1e-5, atol=1e-5)


# -- a failed inject changes nothing ----------------------------------------------------------


def test_failed_inject_on_an_uninitialised_lazy_linear_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LazyLinear(3))
    before, layout = flags(model), structure(model)
    with pytest.raises(LowRankError, match="2"):
        inject(model, ["0", "2"], rank=2)
    assert flags(model) == before and all(before.values())
    assert structure(model) == layout


def test_a_lazy_module_left_untargeted_is_refused_by_name_everywhere():
    """Its parameters have no size, so freezing and counting the model cannot be done."""
    import lowrank
    from lowrank.nn import count_parameters

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LazyLinear(3))
    before, layout = flags(model), structure(model)
    for call in (lambda: inject(model, ["0"], rank=2),
                 lambda: lowrank.count_model(model, ["0"], rank=2),
                 lambda: count_parameters(model)):  # fmt: skip
        with pytest.raises(TargetError, match="module '2' is an uninitialised lazy module"):
            call()
    assert flags(model) == before and structure(model) == layout


class DoubledLinear(nn.Linear):
    """A subclass whose own forward differs from `F.linear` with its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_hard_runs_the_bases_own_forward_and_hooks_with_w_plus_delta():
    torch.manual_seed(0)
    base = DoubledLinear(6, 5).double()
    calls = []
    base.register_forward_hook(lambda *_: calls.append("hook"))
    adapter = LoRALinear(base, 2, alpha=2.0, hard=True)
    nn.init.normal_(adapter.up)
    x = torch.randn(3, 6, dtype=torch.float64)
    delta = adapter.up.detach() @ adapter.down.detach()
    expected = 2 * F.linear(x, base.weight + delta, base.bias)
    assert torch.allclose(adapter(x), expected, rtol=1e-12, atol=1e-12)
    assert calls == ["hook"]


class PaddedConv(nn.Conv2d):
    """timm's `Conv2dSame` idea: padding computed in forward, `padding=0` on the module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


def test_a_conv_subclass_whose_forward_the_branch_cannot_follow_fails_by_name():
    """The branch runs the convolution the module's settings describe; where the subclass's
    own forward computes another (its own padding), no output is given, with or without
    gradients (the no-grad shortcut through `W + ΔW` is not taken for it either)."""
    model = nn.Sequential(PaddedConv(4, 6, 3, stride=2))
    inject(model, ["0"], rank=2)
    x = torch.randn(1, 4, 7, 7)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(TargetError, match="PaddedConv"):
            model(x)


class ChunkedConv(nn.Conv2d):
    """diffusers' "safe" convolutions: the same convolution, run in chunks of the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(1)
        return torch.cat([self._conv_forward(part, self.weight, self.bias) for part in parts])


def test_a_conv_subclass_computing_the_same_convolution_takes_an_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(ChunkedConv(4, 6, 3, padding=1)).double()
    inject(model, ["0"], rank=2)
    adapter = model[0]
    nn.init.normal_(adapter.up)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    base = adapter.base
    expected = F.conv2d(x, base.weight + adapter.delta_weight().detach(), base.bias, padding=1)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert torch.allclose(model(x), expected, rtol=1e-10, atol=1e-10)


def test_centre_tap_on_an_even_kernel_names_the_module():
    model = nn.Sequential(nn.Conv2d(8, 6, (4, 2), padding="same"))
    with pytest.raises(TargetError, match="module '0' does not fit form 'centre_tap'"):
        inject(model, ["0"], rank=2, form="centre_tap")


@pytest.mark.parametrize("form", ["lora", "tucker2", "cp"])
def test_reset_parameters_after_to_empty_starts_at_the_pretrained_model(form):
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Linear(6, 5))
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Linear(6, 5))
    inject(model, ["0", "2"], rank=2, form=form, trainable_scale=True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))  # what to_empty may leave
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    model.load_state_dict(pretrained.state_dict())
    x = torch.randn(2, 4, 3, 6)
    assert torch.equal(model(x), pretrained(x))
    assert all(float(a.scale.detach()) == 1.0 for a in lnn.adapters(model).values())
    adapter = model[2]
    nn.init.normal_(adapter.factor_tensors()[adapter.variant.output])
    adapter.merge()
    with pytest.raises(MergeError, match="unmerge first"):
        adapter.reset_parameters()


class StandardisedConv(nn.Conv2d):
    """Weight standardisation (timm's StdConv2d): the convolution of a transformed weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, weight, self.bias)


def test_a_layer_with_its_own_forward_is_not_merged_where_w_plus_delta_may_differ():
    torch.manual_seed(0)
    model = nn.Sequential(StandardisedConv(4, 6, 3, padding=1))
    inject(model, ["0"], rank=2)
    nn.init.normal_(model[0].up)
    weight = model[0].base.weight.detach().clone()
    with pytest.raises(MergeError, match=r"StandardisedConv \(its forward is its class.s own\)"):
        model[0].merge()
    assert torch.equal(model[0].base.weight, weight) and not model[0].merged


class StandardisedConvForward(nn.Conv2d):
    """Weight standardisation in `_conv_forward`, which torch's own `forward` calls."""

    def _conv_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        weight = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
        return super()._conv_forward(x, weight, bias)


def circular_conv_forward(conv: nn.Conv2d) -> None:
    """Seamless tiling as Stable Diffusion front ends patch it into a loaded model: a
    `_conv_forward` set on the instance that pads circularly."""
    pad = conv._reversed_padding_repeated_twice

    def _conv_forward(self, x, weight, bias):
        x = F.pad(x, pad, mode="circular")
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)

    conv._conv_forward = _conv_forward.__get__(conv)


@pytest.mark.parametrize("how", ["class _conv_forward", "instance _conv_forward"])
def test_a_convolution_that_does_not_run_torchs_zero_padded_conv_runs_its_own_and_is_not_merged(
    how,
):
    """The base's own convolution plus the zero-padded branch (as PEFT's), with or without
    gradients (no shortcut through `W + ΔW` in a plain convolution), and no merge, which
    would change the output."""
    torch.manual_seed(0)
    layer = StandardisedConvForward if how == "class _conv_forward" else nn.Conv2d
    model = nn.Sequential(layer(4, 6, 3, padding=1)).double()
    inject(model, ["0"], rank=2)
    base = model[0].base
    if how == "instance _conv_forward":
        circular_conv_forward(base)
    nn.init.normal_(model[0].up)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    down, up = factors64(model[0])
    delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    with torch.no_grad():
        expected = base(x) + F.conv2d(x, delta, padding=1)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert torch.allclose(model(x), expected, rtol=1e-10, atol=1e-10)
    weight = base.weight.detach().clone()
    why = {"class _conv_forward": "its forward is its class.s own",
           "instance _conv_forward": "a _conv_forward of its own"}[how]  # fmt: skip
    with pytest.raises(MergeError, match=why):
        lnn.merge(model)
    assert torch.equal(base.weight, weight) and not model[0].merged


def test_a_convolution_set_to_circular_padding_after_inject_pads_its_branch_so_too():
    """Seamless tiling sets `padding_mode = "circular"` on an SD model's convolutions, maybe
    after its adapters were injected: the branch pads circularly too, so the layer is the
    circular convolution with `W + ΔW`, with or without gradients, and merges to it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)).double()
    inject(model, ["0"], rank=2)
    base = model[0].base
    base.padding_mode = "circular"
    nn.init.normal_(model[0].up)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    down, up = factors64(model[0])
    weight = base.weight.detach() + torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    wrapped = torch.cat([x[..., -1:, :], x, x[..., :1, :]], dim=-2)
    wrapped = torch.cat([wrapped[..., -1:], wrapped, wrapped[..., :1]], dim=-1)
    expected = F.conv2d(wrapped, weight, base.bias.detach())
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert torch.allclose(model(x), expected, rtol=1e-10, atol=1e-10)
    lnn.merge(model)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-10, atol=1e-10)


def test_an_embedding_given_max_norm_after_inject_is_not_merged():
    """A lookup with `max_norm` renormalises the rows it reads: with W + ΔW merged into the
    table it would renormalise those sums (output moved by 0.32), not the base rows alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4)).double()
    inject(model, ["0"], rank=2)
    base = model[0].base
    base.max_norm = 1.0  # after inject, which refuses it before
    nn.init.normal_(model[0].up)
    ids = torch.tensor([1, 3, 5])
    down, up = factors64(model[0])
    weight = base.weight.detach().clone()
    expected = F.embedding(ids, weight.clone(), max_norm=1.0) + (up @ down).T[ids]
    for grad in (True, False):
        base.weight.data.copy_(weight)  # each lookup renormalises the rows it read
        with torch.set_grad_enabled(grad):
            assert torch.allclose(model(ids), expected, rtol=1e-10, atol=1e-10)
    base.weight.data.copy_(weight)
    with pytest.raises(MergeError, match=r"renormalises the rows it reads \(max_norm=1.0\)"):
        lnn.merge(model)
    assert torch.equal(base.weight, weight) and not model[0].merged


def test_an_injected_model_still_traces_with_torch_fx():
    """A traced conv adapter takes the branch, whatever the traced graph is later run under
    (the weight-space shortcut without gradients is chosen per call)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Unflatten(1, (8, 1)),
                          nn.Conv1d(8, 4, 3, padding=1))  # fmt: skip
    inject(model, ["0", "3"], rank=2)
    nn.init.normal_(model[3].up)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 8)
    lin, conv = model[0], model[3]
    with torch.no_grad():  # float64, with each layer's W + ΔW (both scales 1: alpha = r)
        w0 = lin.base.weight.double() + lin.up.double() @ lin.down.double()
        hidden = F.relu(x.double() @ w0.T + lin.base.bias.double())[:, :, None]
        w3 = conv.base.weight.double() + torch.einsum(
            "or,rik->oik", conv.up.double()[:, :, 0], conv.down.double()
        )
        expected = F.conv1d(hidden, w3, conv.base.bias.double(), padding=1)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(traced(x), model(x))
            torch.testing.assert_close(traced(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_hard_adapters_trace_with_torch_fx_or_are_refused_by_name():
    """A hard adapter on a plain layer traces (as its branch), equal to the layer
    with `W + ΔW` in float64; over a layer with its own forward, which it calls with
    `W + ΔW` through `functional_call` (tensors only), tracing is a `TargetError` naming
    that class."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    inject(model, ["0", "2"], rank=2, hard=True)
    for i in (0, 2):
        nn.init.normal_(model[i].up)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 6)
    torch.testing.assert_close(traced(x).double(), mlp64(model, x), rtol=1e-5, atol=1e-5)
    own = nn.Sequential(MatmulLinear(6, 5))
    inject(own, ["0"], rank=2, hard=True)
    with pytest.raises(TargetError, match=r"torch\.fx cannot trace hard=True over MatmulLinear"):
        torch.fx.symbolic_trace(own)


@pytest.mark.parametrize("form", ["lora", "tucker2"])
def test_an_adapter_traced_as_the_root_of_a_graph_checks_its_extra_arguments(form):
    """Traced as the root, an adapter's `*args` and `**kwargs` are placeholders (fx's
    TraceError before: they were read as a condition): the graph computes the layer with
    `W + ΔW` (float64 reference) and refuses further arguments at each call, by name."""
    torch.manual_seed(0)
    adapter = LoRALinear(nn.Linear(6, 4), 2, form=form)
    nn.init.normal_(adapter.up)
    graph = torch.fx.symbolic_trace(adapter)
    x = torch.randn(3, 6)
    with torch.no_grad():
        factors = [getattr(adapter, n).double() for n in ("up", "mid", "down") if
                   hasattr(adapter, n)]  # fmt: skip
        weight = adapter.base.weight.double() + adapter.scale * torch.linalg.multi_dot(factors)
        expected = x.double() @ weight.T + adapter.base.bias.double()
    torch.testing.assert_close(graph(x).double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TargetError, match=r"beyond its input x \(int\)"):
        graph(x, 3)


def test_a_traced_hard_adapter_reads_its_factors_at_each_call():
    """A hard adapter's traced graph computes ΔW from the factors it holds at each call, as
    the model does: changed factors (a training step, a loaded state) change its output, and
    gradients reach them (a graph with the trace-time ΔW as a constant gave the old layer,
    4.7 apart, and no gradients)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Unflatten(1, (4, 1)),
                          nn.Conv1d(4, 3, 1), nn.Flatten())  # fmt: skip
    inject(model, ["0", "2", "4"], rank=2, hard=True)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 6)
    with torch.no_grad():
        for i in (0, 2, 4):
            nn.init.normal_(model[i].up)
        weights = []
        for m in (model[0], model[2], model[4]):
            delta = m.up.double().flatten(1) @ m.down.double().flatten(1)
            weights.append(m.base.weight.double().flatten(1) + delta)
        hidden = F.relu(x.double() @ weights[0].T + model[0].base.bias.double())
        hidden = hidden @ weights[1].T + model[2].base.bias.double()
        expected = hidden @ weights[2].T + model[4].base.bias.double()
    got = traced(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    for i in (0, 2, 4):
        assert model[i].down.grad is not None and model[i].down.grad.abs().sum() > 0


@pytest.mark.parametrize("setting", [{"padding_idx": 0}, {"scale_grad_by_freq": True}])
def test_a_traced_hard_embedding_has_the_gradients_of_its_lookup(setting):
    """A traced hard embedding looks up `W + ΔW` as the model does, its gradients those of
    torch's lookup in float64: as a branch, `up` got gradients from `padding_idx` rows and
    unscaled by `scale_grad_by_freq` (1.55 and 0.62 apart)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4, **setting))
    inject(model, ["0"], rank=2, alpha=4, hard=True)
    nn.init.normal_(model[0].up)
    traced = torch.fx.symbolic_trace(model)
    ids, grad = torch.tensor([[0, 1, 1, 0, 3]]), torch.randn(1, 5, 4)
    (traced(ids) * grad).sum().backward()
    embed = model[0]
    down, up = (t.detach().double().requires_grad_() for t in (embed.down, embed.up))
    table = embed.base.weight.double() + 2 * (up @ down).T
    (F.embedding(ids, table, **setting) * grad.double()).sum().backward()
    for factor, expected in ((embed.down, down.grad), (embed.up, up.grad)):
        torch.testing.assert_close(factor.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_traced_graph_switches_its_dropout_with_train_and_eval():
    """A graph traced in training mode, switched to `eval()`, runs no dropout, equal to the
    layers with `W + ΔW` in float64; switched back to `train()`, it drops again (the mode at
    trace time was a constant of the graph: it kept dropping in eval, 17 off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    inject(model, ["0", "2"], rank=2, alpha=4, dropout=0.5)
    for i in (0, 2):
        nn.init.normal_(model[i].up)
    traced = torch.fx.symbolic_trace(model.train())
    x = torch.randn(64, 6)
    expected = mlp64(model, x, scale=2.0)
    with torch.no_grad():
        torch.testing.assert_close(traced.eval()(x).double(), expected, rtol=1e-5, atol=1e-5)
        traced.train()
        assert not torch.equal(traced(x), traced(x))


def test_a_fused_adapter_traces_with_torch_fx_as_its_branch():
    """`lora_linear` takes tensors, not the proxies torch.fx traces with: a traced fused
    adapter runs the unfused branch, equal to the layer with `W + ΔW` in float64 (tracing was
    a DTypeError, 'x must be a torch.Tensor, got Proxy')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    inject(model, ["0", "2"], rank=2, alpha=4, fused=True)
    traced = torch.fx.symbolic_trace(model)
    for i in (0, 2):
        nn.init.normal_(model[i].up)
    x = torch.randn(3, 6)
    torch.testing.assert_close(traced(x).double(), mlp64(model, x, scale=2.0), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_a_traced_graph_converted_to_another_dtype_runs_in_it():
    """A traced graph casts the branch input to the factors' dtype as the graph holds them
    when it runs: converted after tracing (`traced.double()`), it equals the layers with
    `W + ΔW` in float64 (the trace-time float32 was baked in: a raw dtype RuntimeError)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    inject(model, ["0", "2"], rank=2, alpha=4)
    for i in (0, 2):
        nn.init.normal_(model[i].up)
    traced = torch.fx.symbolic_trace(model).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        w0, w2 = (m.base.weight + 2 * m.up @ m.down for m in (model[0], model[2]))
        hidden = F.relu(x @ w0.T + model[0].base.bias)
        expected = hidden @ w2.T + model[2].base.bias
        torch.testing.assert_close(traced(x), expected, rtol=1e-12, atol=1e-12)


class BufferScaledEmbedding(nn.Embedding):
    """Gemma 3's scaled embedding: the lookup times an `embed_scale` buffer."""

    def __init__(self, num: int, dim: int, scale: float) -> None:
        super().__init__(num, dim)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.embed_scale.to(self.weight.dtype)


def test_adapters_over_layers_with_their_own_forward_trace_with_torch_fx():
    """An unfused adapter over a layer with its own forward (FalconLinear's matmul, Gemma's
    scaled lookup) traces, equal to the layers with `W + ΔW` in float64: tracing was a raw
    TraceError (the output-shape check read a proxy's shape)."""
    torch.manual_seed(0)
    model = nn.Sequential(BufferScaledEmbedding(10, 6, 3.0), MatmulLinear(6, 4))
    inject(model, ["0", "1"], rank=2, alpha=4)
    traced = torch.fx.symbolic_trace(model)
    for i in (0, 1):
        nn.init.normal_(model[i].up)
    ids = torch.tensor([[1, 5, 9, 2]])
    embed, head = model
    with torch.no_grad():
        table = embed.base.weight.double() + 2 * (embed.up.double() @ embed.down.double()).T
        weight = head.base.weight.double() + 2 * head.up.double() @ head.down.double()
        expected = 3.0 * table[ids] @ weight.T + head.base.bias.double()
    torch.testing.assert_close(traced(ids).double(), expected, rtol=1e-5, atol=1e-5)


class CausalConv1d(nn.Conv1d):
    """A causal convolution: padded k − 1 on both sides, the trailing k − 1 outputs cut off."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[..., : x.shape[-1]]


def test_a_traced_branch_of_another_shape_than_its_base_is_refused_by_name():
    """Over a layer whose own forward gives another shape than its weight and settings
    describe (a causal convolution), a traced graph refuses the branch as the model does, at
    each call: it returned a length-1 output broadcast to the branch's length 3 (a silent
    wrong answer), and a raw RuntimeError for longer inputs."""
    model = nn.Sequential(CausalConv1d(4, 3, 3, padding=2))
    inject(model, ["0"], rank=2)
    traced = torch.fx.symbolic_trace(model)
    for length in (1, 5):
        x = torch.randn(2, 4, length)
        for run in (model, traced):
            with pytest.raises(TargetError, match=r"base layer \(CausalConv1d\) gave an output"):
                run(x)


def test_a_centre_tap_whose_base_stops_keeping_its_size_is_refused_by_name():
    """A centre-tap branch is two 1×1 convolutions, ΔW only on a size-keeping convolution:
    padding changed after `inject` made the training forward fail in torch's add and the
    no-gradient one return a map of another size; both are a `TargetError` now."""
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    inject(model, ["0"], rank=2, form="centre_tap")
    model[0].base.padding = (2, 2)
    x = torch.randn(1, 4, 8, 8)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(TargetError, match="centre-tap"):
            model(x)


class MatmulLinear(nn.Linear):
    """transformers' FalconLinear: its own forward, the plain operation of its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class ScaledEmbedding(nn.Embedding):
    """Gemma's and BART's scaled embeddings: the lookup times a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 4.0


@pytest.mark.parametrize(("make", "x"), [
    (lambda: MatmulLinear(6, 5), torch.randn(3, 6)),
    (lambda: ChunkedConv(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5)),
])  # fmt: skip
def test_a_subclass_computing_the_plain_operation_merges(make, x):
    torch.manual_seed(0)
    model = nn.Sequential(make()).double()
    inject(model, ["0"], rank=2)
    nn.init.normal_(model[0].up)
    x = x.double()
    expected = model(x)
    model[0].merge()
    assert torch.allclose(model(x), expected, rtol=1e-10, atol=1e-10)


def test_a_scaled_embedding_is_not_merged():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledEmbedding(10, 4))
    inject(model, ["0"], rank=2)
    nn.init.normal_(model[0].up)
    with pytest.raises(MergeError, match="ScaledEmbedding"):
        model[0].merge()


@pytest.mark.parametrize("default", [torch.float64, torch.float16])
@pytest.mark.parametrize(("make", "x", "mergeable"), [
    (lambda: MatmulLinear(6, 5), torch.randn(3, 6), True),
    (lambda: ChunkedConv(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5), True),
    (lambda: nn.Embedding(10, 4), torch.tensor([[1, 9, 3]]), True),
    (lambda: DoubledLinear(6, 5), torch.randn(3, 6), False),
])  # fmt: skip
def test_the_merge_probe_runs_in_float32_whatever_the_default_dtype(default, make, x, mergeable):
    """The probe's input and its random ΔW were made in torch's default dtype while the
    layer's tensors are cast to float32, so under `torch.set_default_dtype(torch.float64)`
    every stock layer with a hook and every subclass failed on a dtype mismatch: a false
    `MergeError` (a false `TargetError` for a PiSSA start)."""
    torch.manual_seed(0)
    model = nn.Sequential(make()).double()
    if type(model[0]) is nn.Embedding:
        model[0].register_forward_hook(lambda *_: None)  # a stock layer the probe runs
    inject(model, ["0"], rank=2)
    nn.init.normal_(model[0].up)
    adapter = model[0]
    base = copy.deepcopy(adapter.base)
    with torch.no_grad():
        base.weight += adapter.delta_weight().double()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        if not mergeable:
            with pytest.raises(MergeError, match="does not compute the layer plus"):
                adapter.merge()
            return
        adapter.merge()
    finally:
        torch.set_default_dtype(previous)
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=1e-10, atol=1e-10)


def test_whether_a_layer_merges_does_not_depend_on_its_factors():
    """A fresh adapter (ΔW = 0) of a scaled embedding must refuse a merge and a swap as a
    trained one does: a swap would merge the trained factors next."""
    from lowrank.nn import adapter_state_dict, swap_adapter

    torch.manual_seed(0)
    trained = nn.Sequential(ScaledEmbedding(10, 4))
    inject(trained, ["0"], rank=2)
    nn.init.normal_(trained[0].up)
    fresh = nn.Sequential(ScaledEmbedding(10, 4))
    inject(fresh, ["0"], rank=2)
    for call in (fresh[0].merge, lambda: swap_adapter(fresh, adapter_state_dict(trained))):
        with pytest.raises(MergeError, match="ScaledEmbedding"):
            call()
    assert not fresh[0].merged


def test_a_plain_layer_whose_hook_changes_its_output_is_not_merged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    model[0].register_forward_hook(lambda module, args, out: 2 * out)
    inject(model, ["0"], rank=2)
    nn.init.normal_(model[0].up)
    with pytest.raises(MergeError, match=r"\(it has hooks or a forward of its own\): with W"):
        model[0].merge()


def test_the_merge_probe_leaves_the_layer_as_it_was_and_names_what_failed():
    """It runs the layer's own code: on copies of its tensors, outside autocast, and an
    exception there is the reason given, not a raw error."""
    torch.manual_seed(0)
    model = nn.Sequential(MatmulLinear(6, 5))
    model[0].register_buffer("seen", torch.zeros(()))
    model[0].register_forward_hook(lambda module, args, out: module.seen.fill_(7.0) and None)
    inject(model, ["0"], rank=2)
    nn.init.normal_(model[0].up)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model[0].merge()  # the probe in bfloat16 autocast would miss 1e-2
    assert float(model[0].base.seen) == 0.0
    picky = nn.Sequential(nn.Linear(6, 5))
    picky[0].register_forward_pre_hook(lambda module, args: args[0][0, 0, 0, 0] and None)
    inject(picky, ["0"], rank=2)
    with pytest.raises(MergeError, match="raised IndexError on a probe"):
        picky[0].merge()


class MatrixOnlyLinear(nn.Linear):
    """A forward that takes 2-D input only (`addmm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight.t())


def test_the_merge_probe_is_tried_each_time_on_copies_and_in_the_shape_the_layer_takes():
    torch.manual_seed(0)
    model = nn.Sequential(MatrixOnlyLinear(6, 5))
    model[0].register_buffer("calls", torch.zeros((), dtype=torch.int64))
    model[0].register_forward_hook(lambda module, args, out: module.calls.add_(1) and None)
    inject(model, ["0"], rank=2)
    nn.init.normal_(model[0].up)
    model[0].merge()  # a (3, in) probe after the (1, 3, in) one fails
    assert int(model[0].base.calls) == 0
    model[0].unmerge()
    handle = model[0].base.register_forward_hook(lambda module, args, out: 2 * out)
    with pytest.raises(MergeError, match=r"\(its forward is its class.s own\)"):
        model[0].merge()  # the hook added since the last merge is seen
    handle.remove()
    model[0].merge()


class CountingLinear(nn.Linear):
    """Counts its forward calls."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.linear(x, self.weight, self.bias)


def test_a_model_merge_probes_each_layer_once():
    """A probe runs the layer twice (with W and with W + D)."""
    from lowrank.nn import merge

    torch.manual_seed(0)
    model = nn.Sequential(CountingLinear(6, 5), CountingLinear(5, 4))
    inject(model, ["0", "1"], rank=2)
    assert merge(model) == 0
    assert [model[0].base.calls, model[1].base.calls] == [2, 2]


class RankDependentLinear(nn.Linear):
    """Normalises its weight for 3-D input only: the (3, in) probe alone would pass it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight / self.weight.norm() if x.dim() == 3 else self.weight
        return F.linear(x, weight, self.bias)


def test_a_probe_the_layer_takes_decides_and_complex_outputs_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(RankDependentLinear(6, 5))
    inject(model, ["0"], rank=2)
    nn.init.normal_(model[0].up)
    with pytest.raises(MergeError, match="transforms its weight"):
        model[0].merge()
    complex_out = nn.Sequential(nn.Linear(6, 5))
    complex_out[0].register_forward_hook(
        lambda module, args, out: torch.view_as_complex(torch.stack([out, out], -1))
    )
    inject(complex_out, ["0"], rank=2)
    with pytest.raises(MergeError, match="complex64, not a real float"):
        complex_out[0].merge()


def test_unmerge_takes_out_the_delta_its_merge_put_in():
    """Factors changed while merged (an optimiser step with the momentum of earlier ones)
    must not leave W − ΔW_new + ΔW_old behind: unmerge restores W, then the new factors
    apply."""
    from lowrank.nn import merge, unload, unmerge

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    inject(model, ["0"], rank=2, trainable_scale=True)
    nn.init.normal_(model[0].up)
    adapter, original = model[0], model[0].base.weight.detach().clone()
    for undo in (unmerge, lambda m: m[0].unmerge(), unload):
        merge(model)
        with torch.no_grad():
            adapter.up.add_(0.5)
            adapter.scale.mul_(1.5)
        undo(model)
        torch.testing.assert_close(adapter.base.weight, original, rtol=0, atol=1e-6)
        for exact in (False, True) if undo is unmerge else ():  # a merged model's state holds
            merge(model, exact=exact)  # the factors merged into it
            with torch.no_grad():
                adapter.up.add_(0.5)
            fresh = copy.deepcopy(model)
            fresh.load_state_dict(model.state_dict())
            with torch.no_grad():  # a step after resuming from the merged state
                fresh[0].up.add_(1.0)
            resumed = copy.deepcopy(fresh.state_dict())
            fresh[0].unmerge()
            torch.testing.assert_close(fresh[0].base.weight, original, rtol=0, atol=1e-6)
            fresh.load_state_dict(resumed)  # that state holds the factors in its weight
            fresh[0].unmerge()
            torch.testing.assert_close(fresh[0].base.weight, original, rtol=0, atol=1e-6)
            unmerge(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    delta = float(adapter.scale.detach()) * adapter.up.double() @ adapter.down.double()
    expected = x @ (original.double() + delta).T + adapter.base.bias.double()
    torch.testing.assert_close(adapter(x.float()).double(), expected, rtol=1e-5, atol=1e-6)


def test_flags_and_inference_tensors_that_cannot_load_are_refused_first():
    """A malformed `merged` / `residual` flag is a `StateDictError`, as is a load into
    adapters made under `torch.inference_mode` from outside it (the copy would fail halfway):
    nothing changes either way."""
    from lowrank.errors import StateDictError
    from lowrank.nn import adapter_state_dict, load_adapter_state_dict, swap_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    inject(model, ["0"], rank=2)
    with torch.inference_mode():
        inject(model, ["1"], rank=2)
    state = {k: v.clone() + 1 for k, v in adapter_state_dict(model).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    two = torch.tensor([True, False])
    extra = torch.tensor([2.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    calls = [
        (lambda: load_adapter_state_dict(model, {**state, "0.residual": two}), "0.residual"),
        (lambda: swap_adapter(model, {**state, "0.residual": "yes"}), "0.residual"),
        (lambda: model.load_state_dict({**before, "0._extra_state": extra}), r"\[0\] \(merged"),
        (lambda: model.load_state_dict({**before, "0._extra_state": two}), "shape \\(5,\\)"),
        (lambda: load_adapter_state_dict(model, state), "inference_mode"),
        (lambda: swap_adapter(model, state), "inference_mode"),
    ]
    for call, match in calls:
        with pytest.raises(StateDictError, match=match):
            call()
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    plain = nn.Sequential(nn.Linear(8, 6))
    inject(plain, ["0"], rank=2)
    saved = {k: v for k, v in plain.state_dict().items() if not k.endswith("_extra_state")}
    for flag in (torch.tensor(False, dtype=torch.float16), 0, np.False_):  # an older state
        plain.load_state_dict({**saved, "0.merged": flag})
    with torch.inference_mode():
        load_adapter_state_dict(model, state)
    assert torch.equal(model[1].down, state["1.down"])


def test_a_base_loaded_under_inference_mode_is_not_written_outside_it():
    """A server loads its base under `torch.inference_mode()` and adapts it outside: merge
    and swap raised torch's raw `RuntimeError`, and the failed swap had already copied the
    new factors in. Now a `MergeError` comes first and nothing changes; inside inference
    mode both work."""
    from lowrank.nn import adapter_state_dict, merge, swap_adapter, unmerge

    torch.manual_seed(0)
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    inject(model, ["0", "1"], rank=2)
    state = {k: torch.randn_like(v) for k, v in adapter_state_dict(model).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: merge(model), lambda: swap_adapter(model, state)):
        with pytest.raises(MergeError, match="inference_mode"):
            call()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.inference_mode():
        merge(model)
    with pytest.raises(MergeError, match="inference_mode"):
        unmerge(model)
    assert all(adapter.merged for adapter in lnn.adapters(model).values())


@pytest.mark.parametrize(
    ("dtype", "settings"),
    [
        (torch.float16, dict(alpha=1e5, rank=1, trainable_scale=True)),
        (torch.bfloat16, dict(scale=1e39, rank=2)),  # float32, where bf16 products run
        (torch.float32, dict(scale=-1e39, rank=2, trainable_scale=True)),
    ],
)
def test_a_scale_beyond_the_weights_dtype_is_refused_at_inject(dtype, settings):
    """A scale finite as a Python float but beyond the layer's dtype became Inf there, and
    a fresh adapter (ΔW = 0) gave NaN outputs where the base layer's were finite."""
    from lowrank.errors import DTypeError

    model = nn.Sequential(nn.Linear(4, 4)).to(dtype)
    held = dtype if settings.get("trainable_scale") else torch.float32
    with pytest.raises(DTypeError, match=f"beyond {held}"):
        inject(model, ["0"], **settings)
    assert type(model[0]) is nn.Linear
    within = {"alpha": 1.0} if "alpha" in settings else {"scale": 1e4}
    inject(model, ["0"], **{**settings, **within})
    assert torch.isfinite(model(torch.randn(2, 4, dtype=dtype))).all()
    for fused in (False, True):  # a fixed scale beyond float16 runs fine, fused or not
        fixed = nn.Sequential(nn.Linear(4, 4)).half()
        inject(fixed, ["0"], rank=1, alpha=7e4, fused=fused)
        nn.init.normal_(fixed[0].down, std=1e-4)  # 2^17 · up is beyond float16, y is not
        with torch.no_grad():
            fixed[0].up.copy_(torch.tensor([[0.6], [-0.9], [1.2], [0.8]]))
        x = torch.randn(2, 4)
        base = fixed[0].base
        expected = F.linear(x.double(), base.weight.double(), base.bias.double()) + 7e4 * (
            x.double() @ fixed[0].down.double().t() @ fixed[0].up.double().t()
        )
        torch.testing.assert_close(fixed(x.half()).double(), expected, rtol=1e-2, atol=1e-2)


def test_a_complex_weight_is_not_merged_into():
    from lowrank.errors import DTypeError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, dtype=torch.complex64))
    inject(model, ["0"], rank=2)
    before = model[0].base.weight.clone()
    with pytest.raises(DTypeError, match="complex64"):
        model[0].merge()
    assert torch.equal(model[0].base.weight, before) and not model[0].merged


def test_a_complex_adapter_with_a_trainable_scale_trains_on_complex_gradients():
    """The trainable scale's product on the branch took complex64 for a narrow dtype whose
    gradients belong in float32: the backward cast them there and dropped their imaginary
    parts (0.8 relative error). Output and gradients against complex128."""
    from lowrank.errors import DTypeError

    torch.manual_seed(0)
    adapter = LoRALinear(nn.Linear(6, 5, dtype=torch.complex64), 2, trainable_scale=True)
    with torch.no_grad():
        for factor in (adapter.down, adapter.up, adapter.scale):
            factor.copy_(torch.randn_like(factor))
    x = torch.randn(3, 6, dtype=torch.complex64)
    y = adapter(x)
    (y.abs() ** 2).sum().backward()
    wide = {n: p.detach().to(torch.complex128).requires_grad_()
            for n, p in adapter.named_parameters()}  # fmt: skip
    want = (F.linear(x.to(torch.complex128), wide["base.weight"], wide["base.bias"])
            + wide["scale"] * (x.to(torch.complex128) @ wide["down"].T @ wide["up"].T))  # fmt: skip
    (want.abs() ** 2).sum().backward()
    torch.testing.assert_close(y.to(torch.complex128), want.detach(), rtol=1e-5, atol=1e-5)
    for name in ("down", "up", "scale"):
        got = getattr(adapter, name).grad.to(torch.complex128)
        torch.testing.assert_close(got, wide[name].grad, rtol=1e-4, atol=1e-4, msg=name)
    with pytest.raises(DTypeError, match="complex64"):  # ΔW as a weight: never merged
        adapter.delta_weight()


def test_complex128_factors_over_a_complex64_layer_run_the_branch_in_complex128():
    """Factors kept wider than a complex base, as float32 ones over a bfloat16 base: the
    branch runs in their dtype and the sum is rounded to the base's (a raw RuntimeError,
    complex64 input against complex128 factors). Against complex128."""
    torch.manual_seed(0)
    wide = torch.complex128
    adapter = LoRALinear(nn.Linear(6, 5, dtype=torch.complex64), 2, alpha=4)
    with torch.no_grad():
        for factor in (adapter.down, adapter.up):
            factor.data = torch.randn_like(factor, dtype=wide)
    x = torch.randn(3, 6, dtype=torch.complex64)
    y = adapter(x)
    base = adapter.base
    with torch.no_grad():
        weight = base.weight.to(wide) + 2 * adapter.up @ adapter.down
        want = F.linear(x.to(wide), weight, base.bias.to(wide))
    assert y.dtype == torch.complex64
    torch.testing.assert_close(y.to(wide), want, rtol=1e-5, atol=1e-5)


def test_a_complex_adapters_own_state_loads_back_and_a_complex_one_into_real_factors_is_refused():
    """`load_adapter_state_dict` refused a complex adapter's own `adapter_state_dict` (a
    DTypeError: "must be a floating-point tensor"). It loads (a real state too), against
    complex128 by hand; complex values into real factors stay refused, nothing changed."""
    from lowrank.errors import DTypeError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, dtype=torch.complex64), nn.Linear(5, 4))
    inject(model, ["0", "1"], rank=2, alpha=4)
    generator = torch.Generator().manual_seed(1)
    state = {key: torch.randn(value.shape, generator=generator, dtype=value.dtype)
             for key, value in lnn.adapter_state_dict(model).items()}  # fmt: skip
    lnn.load_adapter_state_dict(model, state)
    assert all(torch.equal(lnn.adapter_state_dict(model)[k], v) for k, v in state.items())
    x = torch.randn(3, 6, dtype=torch.complex64)
    base, wide = model[0].base, torch.complex128
    weight = base.weight.to(wide) + 2 * state["0.up"].to(wide) @ state["0.down"].to(wide)
    want = F.linear(x.to(wide), weight, base.bias.to(wide))
    torch.testing.assert_close(model[0](x).to(wide), want.detach(), rtol=1e-5, atol=1e-5)
    real = {"0.up": torch.randn(5, 2, generator=generator)}
    lnn.load_adapter_state_dict(model, real, strict=False)
    assert torch.equal(model[0].up, real["0.up"].to(torch.complex64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DTypeError, match=r"1\.up .*complex64"):
        lnn.load_adapter_state_dict(model, {"1.up": state["0.up"][:4]}, strict=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_delta_in_a_float8_dtype_is_summed_in_float32_and_rounded_once():
    """ΔW asked for in float8 (the dtype of a float8 checkpoint) is formed in float32 and
    rounded once, not computed from factors cast to float8, which no product takes."""
    adapter = LoRALinear(nn.Linear(8, 6), 2, alpha=4)
    with torch.no_grad():
        adapter.down.copy_(torch.arange(16.0).reshape(2, 8) % 5 - 2)
        adapter.up.copy_(torch.arange(12.0).reshape(6, 2) % 3 - 1)
    want = 2.0 * adapter.up.detach().double() @ adapter.down.detach().double()
    got = adapter.delta(dtype=torch.float8_e4m3fn)
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.double(), want.to(torch.float8_e4m3fn).double())


@pytest.mark.parametrize("exact", [False, True])
def test_a_merge_on_the_meta_device_then_materialised_saves_its_state(exact):
    from lowrank.nn import LoRALinear

    with torch.device("meta"):
        adapter = LoRALinear(nn.Linear(6, 5), 2)
    adapter.merge(exact=exact)
    adapter.to_empty(device="cpu")
    state = adapter.state_dict()
    assert state["down"].device.type == "cpu" and bool(state["_extra_state"][0])


class ReadsGeometry(nn.Module):
    """A model whose forward reads its layers' geometry, as transformers' Whisper reads
    `conv1.stride[0]` and other models `lm_head.out_features`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, 5)
        self.embed = nn.Embedding(6, 3, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)
        frames = ids.shape[1] // self.conv.stride[0] + self.conv.padding[0]
        return self.head(hidden[:, :frames]).reshape(-1, self.head.out_features)


def test_an_adapter_shows_its_base_layers_geometry():
    """`conv.stride` on an adapted convolution raised AttributeError in the model's own
    forward (Whisper's encoder), as did `in_features` / `out_features` of an adapted linear
    (which PEFT's layers show). Each is the base layer's, and read-only."""
    torch.manual_seed(0)
    model = ReadsGeometry()
    plain = {name: {key: getattr(module, key) for key in keys} for name, module, keys in [
        ("conv", model.conv, ("in_channels", "out_channels", "stride", "padding", "dilation",
                              "padding_mode", "output_padding", "transposed")),
        ("head", model.head, ("in_features", "out_features")),
        ("embed", model.embed, ("num_embeddings", "embedding_dim", "padding_idx", "max_norm",
                                "norm_type", "scale_grad_by_freq", "sparse")),
    ]}  # fmt: skip
    ids = torch.randint(6, (2, 8))
    before = model(ids)
    inject(model, ["conv", "head", "embed"], rank=2)
    for name, attributes in plain.items():
        for key, value in attributes.items():
            assert getattr(getattr(model, name), key) == value, (name, key)
    torch.testing.assert_close(model(ids), before)  # zero adapters, up to rounding
    with pytest.raises(AttributeError):
        model.conv.stride = (1,)


def test_a_calls_dropout_passes_over_embeddings():
    """`inject(model, ["embed", "head"], dropout=0.1)` was refused whole for the embedding,
    where PEFT adapts both (its embedding applies no dropout). The embedding now takes
    dropout 0 and the linear 0.1; a pattern that gives the embedding its own dropout is
    still an error."""
    model = ReadsGeometry()
    inject(model, ["embed", "head"], rank=2, dropout=0.1)
    assert (model.embed.dropout, model.head.dropout) == (0.0, 0.1)
    with pytest.raises(TargetError, match="dropout"):
        inject(ReadsGeometry(), {"embed": {"dropout": 0.1}}, rank=2)


# -- state dicts: a refused load changes nothing, and a kept state dict stays consistent -------


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _merged_linear() -> tuple[nn.Module, nn.Module]:
    """A 1-layer model, and a copy of it adapted (rank 4, alpha 8), randomised and merged."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8))
    saved = copy.deepcopy(plain)
    inject(saved, ["0"], rank=4, alpha=8)
    randomise(saved)
    lnn.merge(saved)
    return plain, saved


def _linear64(model: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
    """W x + b + scale · up down x in float64, from the original W of a 1-layer model."""
    adapter = model[0]
    down, up = factors64(adapter)
    base = adapter.base
    return F.linear(x.double(), base.weight.double(), base.bias.double()) + scale * (
        x.double() @ down.t() @ up.t()
    )


@pytest.mark.parametrize("merged", [True, False])
def test_a_strict_load_with_another_scale_or_form_is_refused_before_anything_loads(merged):
    """torch copies every key before it reports an unexpected one: a trainable scale's state
    (or a Tucker2 state's `mid`) into a fixed-scale LoRA left the model loaded, merged at the
    wrong scale, and `unload` then 2.83 off W."""
    from lowrank.errors import StateDictError

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8))
    trained = copy.deepcopy(plain)
    inject(trained, ["0"], rank=4, alpha=8, trainable_scale=True)
    randomise(trained)
    with torch.no_grad():
        trained[0].scale.fill_(5.0)
    if merged:
        lnn.merge(trained)
    tucker = copy.deepcopy(plain)
    inject(tucker, ["0"], rank=(4, 4), form="tucker2")
    for state, strict in itertools.product((trained.state_dict(), tucker.state_dict()),
                                           (True, False)):  # fmt: skip
        model = copy.deepcopy(plain)
        inject(model, ["0"], rank=4, alpha=8)
        before = _snapshot(model)
        with pytest.raises(StateDictError, match="the adapter at '0'"):
            model.load_state_dict(state, strict=strict)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before) and not model[0].merged
        assert torch.equal(lnn.unload(model)[0].weight, plain[0].weight)


def test_a_load_without_strict_ignores_a_stray_key_and_names_a_scale_exactly():
    """torch's load hooks are given strict=True whatever the caller asked, so a stray key
    under an adapter was refused under strict=False too; a refused scale printed 2 beside 2
    for 2 and 2.0000001."""
    from lowrank.errors import StateDictError

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8))
    saved = copy.deepcopy(plain)
    inject(saved, ["0"], rank=4, alpha=8)
    randomise(saved)
    state = copy.deepcopy(saved.state_dict())
    model = copy.deepcopy(plain)
    inject(model, ["0"], rank=4, alpha=8)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*0\.note"):
        model.load_state_dict({**state, "0.note": torch.zeros(1)})
    result = model.load_state_dict({**state, "0.note": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["0.note"]
    assert torch.equal(model[0].up, saved[0].up)
    off = {**state, "0._extra_state": torch.tensor([0, 0, 0, 2.0000001, 0], dtype=torch.float64)}
    with pytest.raises(StateDictError, match=r"scale 2\.0, .* scale 2\.0000001.*adapter_state"):
        model.load_state_dict(off, strict=False)


def test_a_shared_adapter_is_checked_under_every_name_before_anything_loads():
    """torch loads a module shared under two names once per name: the second name's refusal
    came after the first name's tensors were copied."""
    from lowrank.errors import ShapeError

    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    inject(model, ["0"], rank=4)
    assert model[2] is model[0]
    before = _snapshot(model)
    state = copy.deepcopy(model.state_dict())
    state["0.up"] = torch.ones_like(state["0.up"])
    state["2.up"] = torch.ones(8, 3)
    with pytest.raises(ShapeError, match=r"2\.up"):
        model.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torchs_state_dict_tools_map_the_adapters_saved_state_with_its_tensors():
    """`get_model_state_dict` / `set_model_state_dict` put a wrapper's prefix (DDP's
    `module.`, torch.compile's `_orig_mod.`) back on parameters, buffers and extra states
    only: the `merged` and `scale` entries stayed unprefixed, a strict load failed after
    copying the weights, and `strict=False` left a merged weight marked unmerged."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from lowrank.errors import StateDictError

    plain, saved = _merged_linear()
    state = copy.deepcopy(get_model_state_dict(torch.compile(saved)))
    for strict in (True, False):
        model = copy.deepcopy(plain)
        inject(model, ["0"], rank=4, alpha=8)
        set_model_state_dict(torch.compile(model), copy.deepcopy(state),
                             options=StateDictOptions(strict=strict))  # fmt: skip
        assert model[0].merged
        assert torch.equal(lnn.unload(model)[0].weight, lnn.unload(copy.deepcopy(saved))[0].weight)
    other = copy.deepcopy(plain)
    inject(other, ["0"], rank=4, alpha=16)
    before = _snapshot(other)
    with pytest.raises(StateDictError, match=r"merged at scale 2\.0"):
        set_model_state_dict(torch.compile(other), copy.deepcopy(state),
                             options=StateDictOptions(strict=False))  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_the_saved_state_is_one_key_whatever_the_start_and_says_the_start():
    """The residual flag of a PiSSA start was saved only where set, so a template filled in
    place (torch.distributed.checkpoint) from a zero-start model never read it: `unload`
    then returned W − ΔW₀."""
    from lowrank.errors import MergeError

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8))
    pissa, zero = copy.deepcopy(plain), copy.deepcopy(plain)
    inject(pissa, ["0"], rank=4, init="pissa")
    inject(zero, ["0"], rank=4)
    assert set(pissa.state_dict()) == set(zero.state_dict())
    template = zero.state_dict()
    for key, value in pissa.state_dict().items():  # as dcp.load fills a template
        template[key].copy_(value)
    zero.load_state_dict(template)
    assert zero[0].residual
    with pytest.raises(MergeError):
        lnn.unload(zero)


def test_a_distributed_checkpoint_crosses_from_a_fixed_to_a_trainable_scale_only(tmp_path):
    """`dcp.load` fills a template: a fixed-scale checkpoint into a trainable adapter takes
    the scale it records; a trainable one into a fixed adapter lacks the scale its factors
    were trained at (the template has no entry for it) and is refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    from lowrank.errors import StateDictError

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8))
    fixed, trainable = copy.deepcopy(plain), copy.deepcopy(plain)
    inject(fixed, ["0"], rank=4, alpha=8)
    inject(trainable, ["0"], rank=4, alpha=8, trainable_scale=True)
    randomise(fixed)
    randomise(trainable)
    with torch.no_grad():
        trainable[0].scale.fill_(5.0)
    lnn.merge(fixed)
    dcp.save(fixed.state_dict(), checkpoint_id=tmp_path / "fixed")
    dcp.save(trainable.state_dict(), checkpoint_id=tmp_path / "trainable")
    into = copy.deepcopy(plain)
    inject(into, ["0"], rank=4, alpha=16, trainable_scale=True)
    state = {k: v.clone() for k, v in into.state_dict().items()}
    dcp.load(state, checkpoint_id=tmp_path / "fixed",
             planner=DefaultLoadPlanner(allow_partial_load=True))  # fmt: skip
    into.load_state_dict(state)
    assert into[0].merged and float(into[0].scale.detach()) == 2.0
    expected = lnn.unload(copy.deepcopy(fixed))[0].weight
    assert torch.equal(lnn.unload(into)[0].weight, expected)
    other = copy.deepcopy(plain)
    inject(other, ["0"], rank=4, alpha=8)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    dcp.load(state, checkpoint_id=tmp_path / "trainable")
    with pytest.raises(StateDictError, match="trainable scale that it lacks"):
        other.load_state_dict(state)


def test_an_older_state_loads_and_a_merged_one_must_say_its_scale():
    """States saved before `_extra_state` held `merged` / `residual` / a 0-d `scale`: they
    load as they did; a merged one without its scale loaded at any scale (unmerge then up to
    8.5e-2 off W)."""
    from lowrank.errors import StateDictError

    plain, saved = _merged_linear()
    older = {k: v for k, v in saved.state_dict().items() if not k.endswith("_extra_state")}
    older["0.merged"] = torch.tensor(True)
    model = copy.deepcopy(plain)
    inject(model, ["0"], rank=4, alpha=16)
    before = _snapshot(model)
    for strict in (True, False):
        with pytest.raises(StateDictError, match=r"records no scale \(0\.scale\)"):
            model.load_state_dict(older, strict=strict)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    older["0.scale"] = torch.tensor(2.0, dtype=torch.float64)
    with pytest.raises(StateDictError, match=r"merged at scale 2\.0"):
        model.load_state_dict(older)
    same = copy.deepcopy(plain)
    inject(same, ["0"], rank=4, alpha=8)
    same.load_state_dict(older)
    assert same[0].merged
    torch.testing.assert_close(lnn.unload(same)[0].weight, plain[0].weight, rtol=0, atol=1e-6)


def test_a_load_through_a_block_is_checked_whole_first():
    """A load on a block holding two adapters (or on one adapter, with a 0-d scale) ran the
    whole-model check nowhere: the first adapter was copied before the second was refused,
    and an adapter's own load took a scale already Inf."""
    from lowrank.errors import StateDictError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    inject(model, ["0.0", "0.1"], rank=4, alpha=8)
    randomise(model)
    block = model[0]
    state = {k: v if k.endswith("_extra_state") else v + 1 for k, v in block.state_dict().items()}
    state["1._extra_state"] = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0], dtype=torch.float64)
    before = _snapshot(model)
    with pytest.raises(StateDictError, match="the adapter at '1'"):
        block.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    half = nn.Linear(8, 8, dtype=torch.float16)
    trainable = nn.Sequential(half)
    inject(trainable, ["0"], rank=4, trainable_scale=True)
    adapter = trainable[0]
    older = {k: v for k, v in adapter.state_dict().items() if k != "_extra_state"}
    for value in (1e5, 1e-8):
        with pytest.raises(NonFiniteError, match=f"scale = {value!r} .*float16"):
            adapter.load_state_dict({**older, "scale": torch.tensor(value, dtype=torch.float64)})
        assert torch.equal(adapter.scale, older["scale"])
    adapter.load_state_dict({**older, "scale": torch.tensor([1e5])}, assign=True)
    assert adapter.scale.dtype == torch.float32 and float(adapter.scale) == 1e5


def test_a_state_of_another_form_or_a_peft_models_is_refused_in_either_mode():
    """A LoRA state in a Tucker2 adapter of a linear layer (its `down` and `up` fit) loaded
    beside a random `mid` with `strict=False`, 0.28 off; a PEFT model's state loaded
    nothing and said so only as unexpected keys."""
    from lowrank.errors import StateDictError

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(4, 6, 1))
    lora, tucker = copy.deepcopy(plain), copy.deepcopy(plain)
    inject(lora, ["0"], rank=3)
    inject(tucker, ["0"], rank=(3, 3), form="tucker2")
    randomise(lora)
    state = lora.state_dict()
    assert tucker[0].down.shape == state["0.down"].shape
    before = _snapshot(tucker)
    peft = {"0.base_layer.weight": plain[0].weight, "0.lora_A.default.weight": torch.zeros(3, 4)}
    for bad, strict in itertools.product((state, peft), (True, False)):
        with pytest.raises(StateDictError, match="the adapter at '0'"):
            tucker.load_state_dict(bad, strict=strict)
        assert all(torch.equal(before[k], v) for k, v in tucker.state_dict().items())
    mixed = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))  # forms side by side
    inject(mixed, {"0": {"r": [2, 2], "form": "tucker2"}, "1": {"r": 2}})
    mixed.load_state_dict(copy.deepcopy(mixed.state_dict()))


def test_a_tucker2_state_without_its_core_loads_and_records_its_form():
    """A Tucker2 adapter trained with `mid` frozen and saved without it (its `down` and `up`
    have a LoRA state's shapes on a linear layer) was refused as another form; the form a
    state records tells them apart instead."""
    from lowrank.errors import StateDictError

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(4, 6, 1))
    tucker = copy.deepcopy(plain)
    inject(tucker, ["0"], rank=(3, 3), form="tucker2")
    randomise(tucker)
    partial = {k: v for k, v in tucker.state_dict().items() if k in ("0.down", "0.up")}
    other = copy.deepcopy(plain)
    inject(other, ["0"], rank=(3, 3), form="tucker2")
    other.load_state_dict(partial, strict=False)
    assert torch.equal(other[0].down, tucker[0].down)
    state = tucker.state_dict()
    state["0._extra_state"] = state["0._extra_state"].clone()
    state["0._extra_state"][4] = 3.0  # the code of cp
    with pytest.raises(StateDictError, match="of the cp form"):
        other.load_state_dict(state)


def test_a_state_mixing_the_saved_state_and_earlier_flags_is_refused():
    """A template of this version updated with an earlier version's merged checkpoint held
    both: the template's `_extra_state` (unmerged) won and the weight was W + 2ΔW."""
    from lowrank.errors import StateDictError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    inject(model, ["0"], rank=4, alpha=8)
    before = _snapshot(model)
    for older in ({"0.merged": torch.tensor(True)}, {"0.residual": torch.tensor(True)},
                  {"0.scale": torch.tensor(7.0, dtype=torch.float64)}):  # fmt: skip
        with pytest.raises(StateDictError, match=r"0\._extra_state records .*keep one of them"):
            model.load_state_dict({**model.state_dict(), **older}, strict=False)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pissa = nn.Sequential(nn.Linear(8, 8))
    inject(pissa, ["0"], rank=4, init="pissa")
    state = pissa.state_dict()  # adapter_state_dict's residual flag agrees: loads
    pissa.load_state_dict({**state, **lnn.adapter_state_dict(pissa)})
    assert pissa[0].residual


def test_a_whole_state_of_another_form_without_a_record_is_refused_first():
    """An earlier version's LoRA state (no form record) in a Tucker2 adapter of a linear
    layer, whose `down` and `up` have LoRA's shapes, loaded beside a random `mid` (2.7 off)
    or, strict, copied its weights before torch reported `mid` missing; a Tucker2 state in
    a LoRA conv adapter said its rank was wrong, not its form."""
    from lowrank.errors import StateDictError

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8))
    lora, tucker = copy.deepcopy(plain), copy.deepcopy(plain)
    inject(lora, ["0"], rank=2)
    inject(tucker, ["0"], rank=(2, 2), form="tucker2")
    randomise(lora)
    older = {k: v for k, v in lora.state_dict().items() if not k.endswith("_extra_state")}
    older["0.merged"] = torch.tensor(False)
    before = _snapshot(tucker)
    for state, strict in itertools.product(
        (older, {k: v for k, v in older.items() if k != "0.merged"}), (True, False)
    ):
        with pytest.raises(StateDictError, match="of the lora form"):
            tucker.load_state_dict(state, strict=strict)
        assert all(torch.equal(before[k], v) for k, v in tucker.state_dict().items())
    conv = nn.Sequential(nn.Conv2d(4, 4, 3))
    conv_tucker = copy.deepcopy(conv)
    inject(conv, ["0"], rank=2)
    inject(conv_tucker, ["0"], rank=(2, 2), form="tucker2")
    with pytest.raises(StateDictError, match="of the tucker2 form"):
        conv.load_state_dict(conv_tucker.state_dict())


def test_a_shared_adapter_given_other_parts_under_each_name_is_refused_first():
    """One adapter shared as `a` and `b`, a merged state under `a` and factors alone under
    `b`: `a` loaded and merged it, then `b`'s own check refused, the model changed."""
    from lowrank.errors import StateDictError

    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    inject(model, ["0"], rank=4)
    randomise(model)
    lnn.merge(model)
    state = copy.deepcopy(model.state_dict())
    lnn.unmerge(model)
    before = _snapshot(model)
    for key in ("2.base.weight", "2.base.bias", "2._extra_state"):
        del state[key]
    with pytest.raises(StateDictError, match="shared as '0' and '2'"):
        model.load_state_dict(state, strict=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[0].merged
    other = nn.Linear(8, 8)
    three = nn.Sequential(other, nn.ReLU(), other, nn.ReLU(), other)
    inject(three, ["0"], rank=4)
    own = three.state_dict()  # nothing under the first name
    parts = {k: v for k, v in own.items() if k.startswith("2.")}
    parts.update({k: v for k, v in own.items() if k.startswith("4.") and k != "4.up"})
    with pytest.raises(StateDictError, match="shared as '2' and '4'"):
        three.load_state_dict(parts, strict=False)


def test_a_value_that_is_no_tensor_or_a_complex_scale_is_refused_first():
    """A factor or base weight that is no tensor raised torch's RuntimeError after the other
    keys were copied; a complex trainable scale was cast to its real part."""
    from lowrank.errors import StateDictError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    inject(model, ["0"], rank=2, trainable_scale=True)
    state = {k: v + 1 if k != "0._extra_state" else v for k, v in model.state_dict().items()}
    before = _snapshot(model)
    for key, value in (("0.down", "x"), ("0.base.weight", [1.0]), ("0.scale", 2.0),
                       ("0.scale", torch.tensor(2 + 3j))):  # fmt: skip
        with pytest.raises(StateDictError, match=re.escape(key)):
            model.load_state_dict({**state, key: value})
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_every_form_has_its_own_saved_code():
    """Each form is saved as a code of its own (`LowRankAdapter.get_extra_state`)."""
    from lowrank.nn.variants import VARIANTS

    codes = [variant.code for variant in VARIANTS.values()]
    assert min(codes) >= 0 and len(set(codes)) == len(codes)


def test_a_merged_state_saved_after_a_dtype_change_holds_the_factors_it_merged():
    """After `model.to(torch.float64)` the kept merged factors were float32 and skipped:
    the state held factors changed since the merge beside the weight merged with the old
    ones (unmerged, 0.48 off)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8))
    model = copy.deepcopy(plain)
    inject(model, ["0"], rank=4, alpha=8)
    randomise(model)
    lnn.merge(model)
    model.to(torch.float64)
    with torch.no_grad():
        model[0].up.mul_(1.5)
    other = copy.deepcopy(plain).to(torch.float64)
    inject(other, ["0"], rank=4, alpha=8)
    other.load_state_dict(model.state_dict())
    lnn.unmerge(other)
    torch.testing.assert_close(other[0].base.weight, plain[0].weight.double(), rtol=0, atol=1e-6)


def test_a_fixed_scale_assigned_into_a_meta_model_takes_the_trainable_scales_dtype():
    """`assign=True` of a fixed-scale state into a bfloat16 trainable-scale model built on
    the meta device made its scale a float64 parameter."""
    torch.manual_seed(0)
    fixed = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16))
    inject(fixed, ["0"], rank=4, alpha=8)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16))
    inject(model, ["0"], rank=4, alpha=8, trainable_scale=True)
    model.load_state_dict(fixed.state_dict(), assign=True)
    scale = model[0].scale
    assert scale.dtype == torch.bfloat16 and scale.device.type == "cpu" and float(scale) == 2.0


def test_factors_that_hold_no_values_stay_missing_after_a_base_only_load():
    """A model built on the meta device, adapted, then given the un-adapted checkpoint with
    `assign=True`: the load said every key matched while the factors stayed on meta."""
    plain = nn.Sequential(nn.Linear(8, 8))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    inject(model, ["0"], rank=4)
    with pytest.raises(RuntimeError, match=r"Missing key.*0\.down"):
        model.load_state_dict(plain.state_dict(), assign=True)
    result = model.load_state_dict(plain.state_dict(), strict=False, assign=True)
    assert set(result.missing_keys) == {"0.down", "0.up"}


def test_a_scale_beyond_a_trainable_scales_dtype_is_refused():
    """A fixed scale of 10⁵ loaded into a float16 trainable scale became Inf, silently."""
    torch.manual_seed(0)
    fixed = nn.Sequential(nn.Linear(8, 8))
    inject(fixed, ["0"], rank=4, scale=1e5)
    trainable = nn.Sequential(nn.Linear(8, 8, dtype=torch.float16))
    inject(trainable, ["0"], rank=4, trainable_scale=True)
    before = _snapshot(trainable)
    state = {k: v for k, v in fixed.state_dict().items() if k != "0.base.weight"}
    with pytest.raises(NonFiniteError, match=r"0\.scale = 100000\.0 overflows .*float16"):
        trainable.load_state_dict(state, strict=False)
    assert all(torch.equal(before[k], v) for k, v in trainable.state_dict().items())


def test_the_saved_flags_and_scale_are_host_tensors_whatever_the_default_device():
    """The state's scale and flags were made on the default device: under
    `torch.device("meta")` they held no values, and the state did not load."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    inject(model, ["0"], rank=4, alpha=8)
    lnn.merge(model)
    with torch.device("meta"):
        state = model.state_dict()
    assert state["0._extra_state"].device.type == "cpu"
    other = nn.Sequential(nn.Linear(8, 8))
    inject(other, ["0"], rank=4, alpha=8)
    other.load_state_dict(state)
    assert other[0].merged


def test_a_merged_state_loads_only_at_the_scale_it_was_merged_at():
    """A fixed scale is a setting, not a tensor: a merged state saved at alpha 8 loaded into
    alpha 16 held W + 2 up down beside a scale of 4, and `unmerge` gave W − 2 up down."""
    from lowrank.errors import StateDictError

    plain, saved = _merged_linear()
    state = copy.deepcopy(saved.state_dict())
    other = copy.deepcopy(plain)
    inject(other, ["0"], rank=4, alpha=16)
    before = _snapshot(other)
    for strict in (True, False):
        with pytest.raises(StateDictError, match="merged at scale 2"):
            other.load_state_dict(state, strict=strict)
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    same = copy.deepcopy(plain)
    inject(same, ["0"], rank=4, alpha=8)
    same.load_state_dict(state)
    assert same[0].merged
    unmerged = lnn.unload(same)[0].weight.double()
    expected = plain[0].weight.double()
    torch.testing.assert_close(unmerged, expected, rtol=0, atol=1e-6)
    trainable = copy.deepcopy(plain)
    inject(trainable, ["0"], rank=4, alpha=8, trainable_scale=True)
    trainable.load_state_dict(state)  # the fixed scale loads as the trainable one
    assert float(trainable[0].scale.detach()) == 2.0
    assert trainable[0].merged
    unmerged = lnn.unload(trainable)[0].weight.double()
    torch.testing.assert_close(unmerged, expected, rtol=0, atol=1e-6)


def test_the_adapters_own_entries_and_a_cast_scale_reload_strictly():
    """A pruned factor (`up_orig`, `up_mask`) or an old-style spectral norm (`down_u`, …)
    are the adapter's own entries, and a state cast wholesale to bfloat16 holds the scale
    4/3 rounded: each reloads. The keys are the same merged or not (a template that
    `torch.distributed.checkpoint` fills must match the checkpoint's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    inject(model, ["0"], rank=3, alpha=4)
    randomise(model)
    keys = set(model.state_dict())
    assert "0._extra_state" in keys
    lnn.merge(model)
    assert set(model.state_dict()) == keys
    cast = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}  # fmt: skip
    other = nn.Sequential(nn.Linear(8, 8))
    inject(other, ["0"], rank=3, alpha=4)
    other.load_state_dict(cast)
    assert other[0].merged
    lnn.unmerge(model)
    prune.l1_unstructured(model[0], "up", amount=0.5)
    model.load_state_dict(copy.deepcopy(model.state_dict()))
    trainable = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16))
    inject(trainable, ["0"], rank=3, alpha=4, trainable_scale=True)
    fixed = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16))
    inject(fixed, ["0"], rank=3, alpha=4)
    trainable.load_state_dict(fixed.state_dict(), assign=True)
    scale = trainable[0].scale
    assert isinstance(scale, nn.Parameter) and scale.dtype == torch.bfloat16 and scale.shape == (1,)


def test_adapters_injected_into_an_eval_model_do_not_drop():
    """After `model.eval()`, `inject(dropout=0.5)` made adapters in training mode: two
    forwards under no_grad differed by up to 39.9."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
    inject(model, ["0", "2"], rank=4, dropout=0.5)
    randomise(model)
    assert not any(m.training for m in model.modules())
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    assert model[0].training and model[2].training
    assert not torch.equal(model(x), model(x))


def test_a_complex_weight_takes_only_an_unfused_branch():
    """A complex Conv2d's forward without gradients took the weight-space path (a DTypeError
    about 'down'); `hard=True` on a complex Linear failed at every forward."""
    torch.manual_seed(0)
    for kwargs in ({"hard": True}, {"fused": True}):
        model = nn.Sequential(nn.Linear(4, 4, dtype=torch.complex64))
        with pytest.raises(TargetError, match="complex64 weight"):
            inject(model, ["0"], rank=2, **kwargs)
        assert type(model[0]) is nn.Linear
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, dtype=torch.complex64))
    inject(model, ["0"], rank=2)
    randomise(model)
    adapter = model[0]
    x = torch.randn(2, 4, 16, 16, dtype=torch.complex64)
    down, up = adapter.down.detach().to(torch.complex128), adapter.up.detach().to(torch.complex128)
    delta = torch.einsum("or,rikl->oikl", up.flatten(1), down) * adapter.scale
    weight = adapter.base.weight.detach().to(torch.complex128) + delta
    expected = F.conv2d(x.to(torch.complex128), weight, adapter.base.bias.to(torch.complex128),
                        padding=1)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(x).to(torch.complex128), expected, rtol=1e-4, atol=1e-4)


def test_a_pattern_dropout_of_null_is_the_default():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    inject(model, {"0": {"r": 2, "dropout": None}, "1": {"r": 2}}, dropout=0.1)
    assert model[0].dropout == 0.0 and model[1].dropout == 0.1


# -- a float16/bfloat16 adapter's scale·ΔW and scale gradient: formed in float32 ------------

HALF_FORMS = ("lora", "centre_tap", "tucker2", "cp")


def _unscaled_delta64(adapter: nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The adapter's ΔW at scale 1, `(out, in/g, *k)`, from float64 `params` (its factor
    names) by one einsum per group; group j owns the j-th block of rows of each factor (of
    columns of a CP's spatial factors), and a centre tap is put in the middle of the kernel."""
    groups, blocks = adapter.groups, []
    for j in range(groups):
        if adapter.form == "cp":
            out_factor = params["out_factor"].chunk(groups)[j]
            in_factor = params["in_factor"].chunk(groups)[j]
            rank = out_factor.shape[1]
            names = sorted(n for n in params if n.startswith("spatial"))
            spatial = [params[n][:, j * rank : (j + 1) * rank] for n in names]
            axes = "hwz"[: len(spatial)]
            spec = ",".join(["or", "ir", *(f"{a}r" for a in axes)]) + f"->oi{axes}"
            blocks.append(torch.einsum(spec, out_factor, in_factor, *spatial))
            continue
        up = params["up"].chunk(groups)[j].flatten(1)
        down = params["down"].chunk(groups)[j]
        if adapter.form == "tucker2":
            mid = params["mid"].chunk(groups)[j]
            blocks.append(torch.einsum("tp,pq...,qs->ts...", up, mid, down.flatten(1)))
        else:
            blocks.append(torch.einsum("tp,ps...->ts...", up, down))
    delta = torch.cat(blocks)
    kernel = adapter.kernel_size
    if adapter.form == "centre_tap" and tuple(delta.shape[2:]) != kernel:
        padding = [p for k in reversed(kernel) for p in ((k - 1) // 2, k // 2)]
        delta = F.pad(delta, padding)
    return delta


def _layer_op(adapter: nn.Module):
    """The base layer's plain operation `(x, weight) → y`, for float64 references."""
    base = adapter.base
    if isinstance(base, nn.Linear):
        return F.linear
    return lambda x, weight: F.conv2d(x, weight, None, base.stride, base.padding, base.dilation,
                                      base.groups)  # fmt: skip


def _wide_factors(adapter: nn.Module, entries=lambda t: t) -> dict[str, torch.Tensor]:
    """`entries` of float64 copies of the adapter's factors (`torch.abs` for |terms|)."""
    return {n: entries(t.detach().double()) for n, t in adapter.factor_tensors().items()}


def _reference64(adapter, x, upstream, scale, names):
    """`y = op(x, scale · ΔW)` of the adapter's layer in float64 and `∂⟨G, y⟩/∂t` for `t` in
    `names` (factors, and `"scale"`), each with its sums of |terms| (the same from |x|, |G|,
    |scale| and |factors|): float64 autograd through `_unscaled_delta64`."""
    op = _layer_op(adapter)

    def run(entries, weight):
        leaves = {n: t.requires_grad_() for n, t in _wide_factors(adapter, entries).items()}
        leaves["scale"] = entries(torch.tensor(scale, dtype=torch.float64)).requires_grad_()
        y = op(entries(x.double()), leaves["scale"] * _unscaled_delta64(adapter, leaves))
        return y.detach(), torch.autograd.grad((y * weight).sum(), [leaves[n] for n in names])

    value, size = run(lambda t: t, upstream.double()), run(torch.abs, upstream.double().abs())
    return value[0], size[0], value[1], size[1]


@given(form=st.sampled_from(HALF_FORMS), layer=st.sampled_from(["linear", "conv", "grouped conv"]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), trainable=st.booleans(),
       data=st.data())  # fmt: skip
def test_a_half_hard_adapter_rounds_scale_times_delta_and_its_gradients_once(
    form, layer, dtype, trainable, data
):
    """`hard=True` in float16/bfloat16: scale · ΔW (the product of the factors summed in
    float32, times the scale there) rounded once, in the forward, `delta_weight()` and
    `merged_weight`; the gradients of the factors and of a trainable scale formed in
    float32 and rounded once. In float16, products of the factors are drawn near 2^17..2^20,
    beyond 65504, and near 2^-22..2^-16, subnormal, with scale · ΔW within range: ΔW was
    rounded to the dtype before the scale multiplied it (Inf, or a few bits left), and the
    scale's gradient summed products rounded to the dtype."""
    assume(not (form == "centre_tap" and layer == "grouped conv"))  # refused: mixes groups
    if layer == "linear":
        base, x = nn.Linear(6, 4, dtype=dtype), torch.eye(6, dtype=dtype)
    else:
        base = nn.Conv2d(6, 4, 1, groups=2 if layer == "grouped conv" else 1, dtype=dtype)
        x = torch.eye(6, dtype=dtype).reshape(6, 6, 1, 1)
    with torch.no_grad():  # with W = 0, b = 0 and x = I, each output entry is one ΔW entry or 0
        base.weight.zero_()
        base.bias.zero_()
    kind = LoRALinear if layer == "linear" else lnn.LoRAConv
    rank = (2, 3) if form == "tucker2" else 2
    adapter = kind(base, rank, form=form, hard=True, trainable_scale=trainable)
    factors = adapter.factor_tensors()
    half = st.one_of(st.integers(17, 20), st.integers(-22, -16), st.integers(-3, 3))
    exponent = data.draw(half if dtype == torch.float16 else st.integers(-3, 3), label="log2 ΔW")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    with torch.no_grad():  # each of n factors near 2^(exponent / n)
        for factor in factors.values():
            value = torch.randn(factor.shape, generator=generator, dtype=torch.float64)
            factor.copy_(value * 2.0 ** (exponent / len(factors)))
    peak = float(_unscaled_delta64(adapter, _wide_factors(adapter)).abs().max())
    # a scale (no power of 2) that puts max |scale · ΔW| at 2^target, a normal number
    target = data.draw(st.integers(max(-10, exponent - 12), min(12, exponent + 12)))
    scale = data.draw(st.sampled_from([-1.0, 1.0])) * 2.0**target / peak
    info = torch.finfo(dtype)
    assume(info.smallest_normal <= abs(scale) <= 2.0**14)
    if trainable:
        with torch.no_grad():
            adapter.scale.fill_(scale)
        scale = float(adapter.scale.detach())  # as the dtype holds it
    else:
        adapter.scale = scale
    names = [*factors, "scale"] if trainable else list(factors)
    upstream = torch.randn(_layer_op(adapter)(x, base.weight).shape, generator=generator,
                           dtype=torch.float64)  # fmt: skip
    upstream = (upstream * 2.0 ** data.draw(st.integers(-16, 4), label="log2 G")).to(dtype)
    want, size, grads_want, grads_size = _reference64(adapter, x, upstream, scale, names)

    out = adapter(x)
    assert out.dtype == dtype
    assert_gradient_rounded_once(out, want, size)
    delta = scale * _unscaled_delta64(adapter, _wide_factors(adapter))
    delta_size = abs(scale) * _unscaled_delta64(adapter, _wide_factors(adapter, torch.abs))
    assert_gradient_rounded_once(adapter.delta_weight(), delta, delta_size)
    with torch.no_grad():
        assert_gradient_rounded_once(adapter.merged_weight(base.weight), delta, delta_size)
    grads = torch.autograd.grad(out, [adapter.get_parameter(n) for n in names], upstream)
    for name, grad, value, bound in zip(names, grads, grads_want, grads_size, strict=True):
        assert grad.dtype == dtype, name
        if float(value.abs().max()) < 0.99 * info.max:  # a gradient beyond the dtype is Inf
            assert_gradient_rounded_once(grad.reshape(value.shape), value, bound)


@pytest.mark.parametrize(
    ("magnitude", "scale", "upstream"),
    [(300.0, 1.5 * 2.0**-10, 2.0**-8), (1.5 * 2.0**-11, 1000.0, 2.0**4)],
    ids=["unscaled product beyond float16", "unscaled product subnormal"],
)  # fmt: skip
def test_a_float16_hard_lora_with_a_trainable_scale_where_only_the_scaled_update_fits(
    magnitude, scale, upstream
):
    """up @ down near 2 · 300² = 180,000 (beyond 65504), or near 2 · (1.5 · 2^-11)², about
    1e-6 (a float16 subnormal: steps of 2^-24, 6e-8, a few bits): scale · ΔW, about 260 or
    1e-3, fits float16. The earlier hard forward rounded up @ down to float16 first (Inf,
    or a few bits), and so did the gradients of up, down and the scale."""
    dtype = torch.float16
    base = nn.Linear(6, 4, dtype=dtype)
    with torch.no_grad():  # with W = 0, b = 0 and x = I, the output is ΔWᵀ itself
        base.weight.zero_()
        base.bias.zero_()
    x = torch.eye(6, dtype=dtype)
    adapter = LoRALinear(base, 2, hard=True, trainable_scale=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # entries of either sign, magnitude to 2 · magnitude
        for factor in (adapter.down, adapter.up):
            value = 1 + torch.rand(factor.shape, generator=generator, dtype=torch.float64)
            sign = torch.sign(torch.randn(factor.shape, generator=generator))
            factor.copy_(value * sign * magnitude)
        adapter.scale.fill_(scale)
    upstream = (upstream * torch.randn(6, 4, generator=generator, dtype=torch.float64)).to(dtype)
    names = ["down", "up", "scale"]
    held = float(adapter.scale.detach())
    want, size, grads_want, grads_size = _reference64(adapter, x, upstream, held, names)

    out = adapter(x)
    assert_gradient_rounded_once(out, want, size)
    assert_gradient_rounded_once(adapter.delta_weight(), want.T, size.T)
    grads = torch.autograd.grad(out, [adapter.get_parameter(n) for n in names], upstream)
    for grad, value, bound in zip(grads, grads_want, grads_size, strict=True):
        assert_gradient_rounded_once(grad.reshape(value.shape), value, bound)


@given(form=st.sampled_from(HALF_FORMS), layer=st.sampled_from(["linear", "conv"]),
       below=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_a_float16_trainable_scale_sums_its_gradient_on_the_branch_in_float32(
    form, layer, below, seed
):
    """On the unfused branch `∂L/∂scale = Σ G ⊙ branch`. Every product here is `below` binary
    orders under 2^-25, half float16's smallest subnormal, while their sum (G agrees in sign
    with the branch) is 2^-20 or more: torch's backward of `branch * scale` rounded each
    product to float16 before the sum, every one to 0."""
    dtype = torch.float16
    generator = torch.Generator().manual_seed(seed)
    if layer == "linear":
        base = nn.Linear(16, 8, dtype=dtype)
        x = torch.randn(8192, 16, generator=generator, dtype=torch.float64)
    else:
        base = nn.Conv2d(4, 8, 3, padding=1, dtype=dtype)
        x = torch.randn(128, 4, 8, 8, generator=generator, dtype=torch.float64)
    x = (x / 4).to(dtype)
    kind = LoRALinear if layer == "linear" else lnn.LoRAConv
    adapter = kind(base, (2, 3) if form == "tucker2" else 2, form=form, trainable_scale=True)
    factors = adapter.factor_tensors()
    with torch.no_grad():  # ΔW near 2^-11, the branch under 2^-6
        for factor in factors.values():
            value = torch.randn(factor.shape, generator=generator, dtype=torch.float64)
            factor.copy_(value * 2.0 ** (-11 / len(factors)))
    op = _layer_op(adapter)
    branch = op(x.double(), _unscaled_delta64(adapter, _wide_factors(adapter)))
    power = -25 - below - int(torch.ceil(torch.log2(branch.abs().max())))
    upstream = (torch.sign(branch) * 2.0**power).to(dtype)
    assert float((upstream.double() * branch).abs().max()) <= 2.0 ** (-25 - below)
    want = float((upstream.double() * branch).sum())
    assert want >= 2.0**-20

    (grad,) = torch.autograd.grad(adapter(x), adapter.scale, upstream)
    # the float16 branch is the float64 one up to its own roundings (a few float16 eps of its
    # |terms|, or half a subnormal step), beside which the float32 sum's are negligible
    terms = op(x.double().abs(), _unscaled_delta64(adapter, _wide_factors(adapter, torch.abs)))
    size = float((upstream.double().abs() * terms).sum())
    info = torch.finfo(dtype)
    step = info.smallest_normal * info.eps / 2
    bound = info.eps / 2 * want + 8 * info.eps * size + step * (1 + upstream.double().abs().sum())
    assert abs(float(grad) - want) <= bound
