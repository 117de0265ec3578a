"""Random sequences of `lowrank.nn` operations on small real models (a transformers Llama
with and without tied embeddings, GPT-2 with its `Conv1D` layers, a CNN with grouped and
depthwise convolutions behind an embedding, a torch `TransformerEncoderLayer`), valid and
invalid, checked after every step against an independent float64 reference.

The reference is the un-adapted model in float64 with each adapted layer's weight replaced
by `W + s·ΔW` (DoRA's `m ⊙ (W + sΔW) / ‖W + sΔW‖`), ΔW recomposed here by hand from a record
of the factors, never by lowrank. After every step: the model's output on a fixed input,
which tensors train (the adapters' alone), the base weights bit for bit where known, and
that a refused call raised a `LowRankError` and left every tensor and flag as it was.
`merge_and_unload` and `unload` give plain modules; PEFT computes the same forward and the
same merged weights from the same factors. The default profile is a few seconds; the
`exhaustive` one runs longer sequences.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from strategies import machine_tests
from torch import nn

from lowrank import nn as lnn
from lowrank.errors import LowRankError, MergeError, StateDictError

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "float16": torch.float16}  # fmt: skip
# relative tolerance of a model output against the float64 reference (of its largest entry)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 8e-2,
             torch.float16: 1e-2}  # fmt: skip
# the unit roundoff of each dtype
EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8,
       torch.float16: 2.0**-11}  # fmt: skip


# --- the models ------------------------------------------------------------------------


class CNN(nn.Module):
    """An embedding, a grouped and a depthwise 1-D convolution and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv1d(8, 8, 3, padding=1, groups=8, padding_mode="circular")
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).transpose(1, 2)
        x = torch.relu(self.grouped(x))
        x = self.depthwise(x)
        return self.head(x.transpose(1, 2))


class Encoder(nn.Module):
    """A torch `TransformerEncoderLayer` (its attention reads `out_proj.weight`)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class LM(nn.Module):
    """A transformers causal LM, returning its logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.lm = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


def build(kind: str, tied: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=24, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
            tie_word_embeddings=tied, attn_implementation="eager", pad_token_id=0)  # fmt: skip
        model = LM(transformers.LlamaForCausalLM(config))
    elif kind == "gpt2":
        config = transformers.GPT2Config(
            n_embd=16, n_layer=1, n_head=2, vocab_size=24, n_positions=16, bos_token_id=0,
            eos_token_id=0, tie_word_embeddings=tied, attn_implementation="eager",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        model = LM(transformers.GPT2LMHeadModel(config))
    elif kind == "cnn":
        model = CNN()
    else:
        model = Encoder()
    with torch.no_grad():  # biases and norms away from their zeros and ones
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def model_input(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    if kind == "encoder":
        return torch.randn(2, 5, 8, generator=generator)
    vocab = 10 if kind == "cnn" else 24
    ids = torch.randint(vocab, (2, 5), generator=generator)
    ids[0, 0] = 0  # Llama's padding index
    return ids


# modules each model may adapt, and what each is: (layout, groups)
#   layout "out_in": weight (out, in, *k); "in_out": weight (in, out) (Conv1D, embedding)
def pool(model: nn.Module) -> dict[str, tuple[str, int]]:
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, Conv1D)):
            found[name] = ("in_out", 1)
        elif isinstance(module, nn.Linear):
            found[name] = ("out_in", 1)
        elif isinstance(module, nn.Conv1d):
            found[name] = ("out_in", module.groups)
    return found


def tied_names(model: nn.Module) -> set[str]:
    """Names of layers whose weight shares memory with another layer's (an adapter's base
    under the adapter's name): a load with `assign=True` gives tied layers a parameter each
    over one storage, which a later dtype conversion unties."""
    seen: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            owner = name.removesuffix(".base") if name.endswith(".base") else name
            seen.setdefault(weight.untyped_storage().data_ptr(), []).append(owner)
    return {n for names in seen.values() if len(names) > 1 for n in names}


# --- the reference ---------------------------------------------------------------------


@dataclass
class Record:
    """What one adapter should hold, in float64: its base weight W (layout of the layer),
    factors, fixed scale (None: trainable, in `factors["scale"]`), and what is merged."""

    layout: str
    groups: int
    form: str
    dora: bool
    weight: torch.Tensor
    factors: dict[str, torch.Tensor]
    scale: float | None
    bits: torch.Tensor | None  # W bit for bit, where known
    merged_with: dict[str, torch.Tensor] | None = None
    exact: bool = False
    drift: float = 0.0  # how far rounded unmerges may have moved W (absolute)
    rounding: float = 0.0  # the unit roundoff of the dtypes the merged weight was rounded in
    factor_dtype: torch.dtype = torch.float32
    flags: dict[str, bool] = field(default_factory=dict)

    def copy(self) -> Record:
        return Record(
            self.layout, self.groups, self.form, self.dora, self.weight.clone(),
            {k: v.clone() for k, v in self.factors.items()}, self.scale,
            None if self.bits is None else self.bits.clone(),
            None if self.merged_with is None else dict(self.merged_with), self.exact,
            self.drift, self.rounding, self.factor_dtype, dict(self.flags))  # fmt: skip


def delta64(form: str, groups: int, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW `(out, in/g, *k)` at scale 1 in float64, one group at a time."""
    f = {k: v.double() for k, v in factors.items()}
    blocks = []
    for j in range(groups):
        def part(t: torch.Tensor, j: int = j) -> torch.Tensor:
            size = t.shape[0] // groups
            return t[j * size:(j + 1) * size]

        if form == "lora":
            block = torch.einsum("or,r...->o...", part(f["up"]).flatten(1), part(f["down"]))
        elif form == "tucker2":
            up, mid = part(f["up"]).flatten(1), part(f["mid"])
            down = part(f["down"]).flatten(1)
            block = torch.einsum("op,pq...,qi->oi...", up, mid, down)
        else:  # cp
            out, inner = part(f["out_factor"]), part(f["in_factor"])
            rank = out.shape[1]
            spatial = [f[k][:, j * rank:(j + 1) * rank]
                       for k in sorted(k for k in f if k.startswith("spatial"))]  # fmt: skip
            letters = "abc"[: len(spatial)]
            terms = "".join(f",{a}r" for a in letters)
            block = torch.einsum(f"or,ir{terms}->oi{letters}", out, inner, *spatial)
        blocks.append(block)
    return torch.cat(blocks)


def effective(record: Record, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer's effective weight in float64, in its layout."""
    s = factors["scale"].double().reshape(()) if record.scale is None else record.scale
    delta = s * delta64(record.form, record.groups, factors)
    flip = (lambda t: t.t()) if record.layout == "in_out" else (lambda t: t)
    updated = flip(record.weight) + delta  # (out, in, *k)
    if record.dora:
        # not differentiated, as the DoRA paper and PEFT take it
        norm = torch.linalg.vector_norm(updated.detach().flatten(1), dim=1)
        shape = (-1,) + (1,) * (updated.ndim - 1)
        updated = updated * (factors["magnitude"].double() / norm).reshape(shape)
    return flip(updated)


def current_weight(record: Record) -> torch.Tensor:
    used = record.merged_with if record.merged_with is not None else record.factors
    return effective(record, used)


def snapshot(model: nn.Module) -> dict:
    """Everything a refused call must leave as it was, bit for bit."""
    state: dict = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        state["p:" + name] = (t.detach().clone(), t.requires_grad, t.dtype)
    for name, t in model.named_buffers(remove_duplicate=False):
        state["b:" + name] = (t.detach().clone(), False, t.dtype)
    for name, module in model.named_modules(remove_duplicate=False):
        state["m:" + name] = (type(module), module.training)
        if isinstance(module, lnn.LowRankAdapter):
            state["f:" + name] = (module.merged, module.residual, module.disabled)
            kept = module.merged_factors
            state["k:" + name] = None if kept is None else sorted(kept)
    return state


def same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            assert value[1:] == other[1:], key
            a, b = value[0], other[0]
            assert a.shape == b.shape, key
            if a.is_floating_point():
                bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
                assert torch.equal(a.view(bits), b.view(bits)), key
            else:
                assert torch.equal(a, b), key
        else:
            assert value == other, key


# --- the machine -----------------------------------------------------------------------


class ModelMachine(RuleBasedStateMachine):
    @initialize(
        kind=st.sampled_from(["llama", "gpt2", "cnn", "encoder"]),
        tied=st.booleans(),
        dtype=st.sampled_from(["float32", "bfloat16"]),  # others by `to_dtype`
        seed=st.integers(0, 2**16),
        data=st.data(),
    )
    def start(self, kind, tied, dtype, seed, data):
        self.kind, self.tied = kind, tied and kind in ("llama", "gpt2")
        self.dtype = DTYPES[dtype]
        self.coarsest = self.dtype  # the coarsest dtype the weights were rounded in
        self.model = build(kind, self.tied, seed).to(self.dtype)
        # the un-adapted model in float64: the reference, and the values of every tensor
        # the adapters leave alone (rounded as the model's are)
        self.plain = copy.deepcopy(self.model).double()
        self.x = model_input(kind)
        self.generator = torch.Generator().manual_seed(seed)
        self.records: dict[str, Record] = {}
        self.unloaded = False
        self.injects: list[tuple[object, dict]] = []
        self.lossy = 0  # rounded operations since the start (bf16 outputs widen with them)
        self._inject(data)

    # --- helpers -----------------------------------------------------------------------

    def _candidates(self) -> dict[str, tuple[str, int]]:
        adapted = set(lnn.adapters(self.model))
        inside = {n for a in adapted for n, _ in self.model.get_submodule(a).named_modules(
            prefix=a)}  # fmt: skip
        return {n: v for n, v in pool(self.model).items()
                if n not in adapted and n not in inside}  # fmt: skip

    def _inject(self, data) -> None:
        candidates = self._candidates()
        if not candidates:
            return
        settings = {
            "rank": data.draw(st.sampled_from([1, 2, 3]), label="rank"),
            "alpha": data.draw(st.sampled_from([1.0, 4.0, 6.0]), label="alpha"),
            "rslora": data.draw(st.booleans(), label="rslora"),
        }
        if data.draw(st.booleans(), label="trainable_scale"):
            settings["trainable_scale"] = True
        if self.dtype in (torch.bfloat16, torch.float16) and data.draw(st.booleans(),
                                                                       label="wide factors"):
            settings["factor_dtype"] = torch.float32  # PEFT's default
        linear = {n for n in candidates
                  if isinstance(self.model.get_submodule(n), (nn.Linear, Conv1D))}  # fmt: skip
        use_all = bool(linear) and data.draw(st.booleans(), label="all-linear")
        if use_all:
            dora = not settings.get("trainable_scale") and data.draw(st.booleans(), label="dora")
            targets: object = "all-linear"
            settings["dora"] = dora
            if self.kind in ("llama", "cnn") and not dora:
                settings["dropout"] = data.draw(st.sampled_from([0.0, 0.1]), label="dropout")
        else:
            chosen = data.draw(st.lists(st.sampled_from(sorted(candidates)), min_size=1,
                                        max_size=4, unique=True), label="targets")  # fmt: skip
            targets = {}
            for name in chosen:
                module = self.model.get_submodule(name)
                entry: dict = {}
                if isinstance(module, nn.Conv1d):
                    form = data.draw(st.sampled_from(["lora", "tucker2", "cp"]), label="form")
                    entry["form"] = form
                    if form == "tucker2":
                        entry["r"] = [2, settings["rank"]]
                else:
                    how = data.draw(st.sampled_from(["branch", "hard", "dora", "fused"]),
                                    label="how")  # fmt: skip
                    # one `lora_linear` call: one dtype, a constant scale, and not where the
                    # parent reads the weight (`nn.MultiheadAttention.out_proj`)
                    fits = type(module) is nn.Linear and not ({"factor_dtype", "trainable_scale"}
                                                             & settings.keys())
                    if how == "hard":
                        entry["hard"] = True
                    elif how == "fused" and fits:
                        entry["fused"] = True
                    elif how == "dora" and name in linear and not settings.get("trainable_scale"):
                        entry["dora"] = True
                targets[name] = entry
        names = lnn.inject(self.model, targets, **settings)
        self.injects.append((copy.deepcopy(targets), settings))
        # every linear-like layer left (these models hold no output layer PEFT leaves out)
        assert sorted(names) == sorted(linear if use_all else targets), names
        found = lnn.adapters(self.model)
        for name in names:
            adapter = found[name]
            layout, groups = pool(self.plain)[name]
            base = self.plain.get_submodule(name)
            trainable = isinstance(adapter.scale, nn.Parameter)
            rank = adapter.rank[1] if isinstance(adapter.rank, tuple) else adapter.rank
            expected_scale = settings["alpha"] / (math.sqrt(rank) if settings["rslora"] else rank)
            if not trainable:
                assert adapter.scale == pytest.approx(expected_scale, rel=1e-12), name
            self.records[name] = Record(
                layout, groups, adapter.form, adapter.dora, base.weight.detach().clone(),
                {}, None if trainable else expected_scale,
                adapter.base.weight.detach().clone(),
                factor_dtype=settings.get("factor_dtype", self.dtype),
                flags={k: True for k in adapter.adapter_tensors()})  # fmt: skip
            assert torch.equal(adapter.base.weight.double(), base.weight), name
            # a new adapter computes its base layer: its output factor starts at zero
            assert not adapter.factor_tensors()[adapter.variant.output].any(), name
            if adapter.dora:
                self._check_dora_start(name, adapter)
            tensors = adapter.adapter_tensors().items()
            self.records[name].factors = {k: t.detach().double().clone() for k, t in tensors}
        self._randomise(list(names))

    def _check_dora_start(self, name: str, adapter: lnn.LowRankAdapter) -> None:
        record = self.records[name]
        channels = record.weight.t() if record.layout == "in_out" else record.weight
        norm = torch.linalg.vector_norm(channels.flatten(1), dim=1)
        err = float((adapter.magnitude.detach().double() - norm).abs().max())
        assert err <= 4 * EPS[self.dtype] * float(norm.max()), (name, err)

    def stored(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` as the model stores it: rounded to each tensor's dtype."""
        own = lnn.adapter_state_dict(self.model)
        return {k: v.to(own[k].dtype) for k, v in state.items()}

    def random_state(self, names=None, wide: bool = False) -> dict[str, torch.Tensor]:
        """Random adapter tensors in the model's dtype (float64 where `wide`, for the load to
        round), ΔW about as large as W."""
        state = {}
        for name, record in self.records.items():
            if names is not None and name not in names:
                continue
            adapter = self.model.get_submodule(name)
            tensors = adapter.adapter_tensors()
            size = float(record.weight.abs().mean()) + 1e-3
            scale = record.scale if record.scale is not None else 1.0
            count = len([k for k in tensors if k not in ("scale", "magnitude")])
            spread = (size / abs(scale)) ** (1 / count)
            for key, value in tensors.items():
                noise = torch.randn(value.shape, generator=self.generator, dtype=torch.float64)
                if key == "magnitude":
                    noise = record.factors[key] * (1 + 0.3 * noise.abs())
                elif key == "scale":
                    noise = 0.5 + noise.abs()
                else:
                    noise = spread * noise
                state[f"{name}.{key}"] = noise if wide else noise.to(value.dtype)
        return state

    def _randomise(self, names) -> None:
        state = self.random_state(names)
        with torch.no_grad():
            for key, value in state.items():
                name, local = self._split(key)
                self.model.get_submodule(name).adapter_tensors()[local].copy_(value)
                self.records[name].factors[local] = value.double()

    def _split(self, key: str) -> tuple[str, str]:
        for name in sorted(self.records, key=len, reverse=True):
            if key.startswith(name + "."):
                return name, key[len(name) + 1:]
        raise KeyError(key)

    def reference_model(self, records: dict[str, Record] | None = None) -> nn.Module:
        """The un-adapted model in float64 with every adapted layer's effective weight."""
        records = self.records if records is None else records
        model = copy.deepcopy(self.plain)
        for name, record in records.items():
            module = model.get_submodule(name)
            module.weight = nn.Parameter(current_weight(record))  # unties a tied weight
        return model

    def reference_output(self, records=None) -> torch.Tensor:
        with torch.no_grad():
            return self.reference_model(records).eval()(self.typed(torch.float64))

    def typed(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The fixed input, in `dtype` (the model's) where it is a floating tensor."""
        return self.x.to(dtype or self.dtype) if self.x.is_floating_point() else self.x

    def tolerance(self, dtype=None) -> float:
        """Of an output in `dtype` (the model's), or in the coarsest dtype its weights were
        rounded in since the start."""
        dtype = dtype or self.dtype
        return max(TOLERANCE[dtype], TOLERANCE[self.coarsest]) * (1 + 0.25 * self.lossy)

    def close_output(self, got: torch.Tensor, want: torch.Tensor, what: str, dtype=None) -> None:
        scale = float(want.abs().max()) + 1e-6
        drift = sum(r.drift for r in self.records.values())
        err = float((got.detach().double() - want).abs().max())
        allowed = self.tolerance(dtype) * scale + 50 * drift * scale
        assert err <= allowed, (what, err, allowed)

    def refused(self, call, *errors: type[LowRankError]) -> LowRankError:
        before = snapshot(self.model)
        with pytest.raises(errors or LowRankError) as info:
            call()
        same(before, snapshot(self.model))
        return info.value

    def adapters(self) -> dict[str, lnn.LowRankAdapter]:
        return lnn.adapters(self.model)

    def blocked(self, names=None) -> list[str]:
        """Adapters a merge must refuse: their weight is tied to another module's."""
        tied = tied_names(self.model) if self.tied else set()
        return [n for n in (self.records if names is None else names) if n in tied]

    def bump(self, name: str) -> None:
        """A subtracting unmerge: W comes back rounded, up to a few ulps of `W + ΔW`."""
        record = self.records[name]
        merged = effective(record, record.merged_with)
        size = float(merged.abs().max()) + float(record.weight.abs().max())
        if record.dora:
            channels = record.weight.t() if record.layout == "in_out" else record.weight
            norm = torch.linalg.vector_norm(channels.flatten(1), dim=1)
            size *= 1 + float(norm.max()) / float(record.merged_with["magnitude"].abs().min())
        record.drift += 4 * max(record.rounding, EPS[self.dtype]) * size
        record.bits = None
        self.lossy += 1

    def _unmerged(self, name: str) -> None:
        record = self.records[name]
        if record.merged_with is not None and not record.exact:
            self.bump(name)
        record.merged_with, record.exact = None, False

    def _merged(self, name: str, exact: bool) -> None:
        record = self.records[name]
        if record.merged_with is None:
            record.merged_with = {k: v.clone() for k, v in record.factors.items()}
            record.exact = exact
            record.rounding = EPS[self.dtype]
            self.lossy += 1

    def any_adapters(self) -> bool:
        return bool(self.records) and not self.unloaded

    # --- operations --------------------------------------------------------------------

    @precondition(lambda self: not self.unloaded)
    @rule(data=st.data())
    def second_inject(self, data):
        self._inject(data)

    @precondition(lambda self: self.any_adapters())
    @rule(data=st.data())
    def randomise(self, data):
        names = data.draw(st.sets(st.sampled_from(sorted(self.records)), min_size=1))
        self._randomise(names)

    @precondition(lambda self: self.any_adapters())
    @rule(exact=st.booleans(), inference=st.booleans())
    def merge(self, exact, inference):
        blocked = [n for n in self.blocked() if self.records[n].merged_with is None]
        if blocked:
            self.refused(lambda: lnn.merge(self.model, exact=exact), MergeError)
            return
        with torch.inference_mode(inference):  # a server's merge: kept copies made there
            held = lnn.merge(self.model, exact=exact)
        for name in self.records:
            self._merged(name, exact)
        copies = [self.model.get_submodule(n).base.weight
                  for n, r in self.records.items() if r.exact]  # fmt: skip
        assert held == sum(w.numel() * w.element_size() for w in copies)

    @precondition(lambda self: self.any_adapters())
    @rule(data=st.data(), exact=st.booleans())
    def merge_one(self, data, exact):
        name = data.draw(st.sampled_from(sorted(self.records)))
        adapter = self.model.get_submodule(name)
        if self.blocked([name]) and not adapter.merged:
            self.refused(lambda: adapter.merge(exact=exact), MergeError)
            return
        adapter.merge(exact=exact)
        self._merged(name, exact)

    @precondition(lambda self: self.any_adapters())
    @rule(inference=st.booleans())
    def unmerge(self, inference):
        with torch.inference_mode(inference):
            lnn.unmerge(self.model)
        for name in self.records:
            self._unmerged(name)

    @precondition(lambda self: self.any_adapters())
    @rule(data=st.data())
    def unmerge_one(self, data):
        name = data.draw(st.sampled_from(sorted(self.records)))
        self.model.get_submodule(name).unmerge()
        self._unmerged(name)

    @precondition(lambda self: self.any_adapters())
    @rule(exact=st.booleans(), wide=st.booleans(), inference=st.booleans())
    def swap(self, exact, wide, inference):
        state = self.random_state(wide=wide)
        if self.blocked():
            self.refused(lambda: lnn.swap_adapter(self.model, state, exact=exact), MergeError)
            return
        with torch.inference_mode(inference):
            lnn.swap_adapter(self.model, state, exact=exact)
        self._loaded(self.stored(state), merge_all=True, exact=exact)

    def _loaded(self, state: dict, merge_all: bool, exact: bool) -> None:
        touched = {self._split(k)[0] for k in state}
        for key, value in state.items():
            name, local = self._split(key)
            self.records[name].factors[local] = value.double()
        for name, record in self.records.items():
            if record.merged_with is not None and (merge_all or name in touched):
                if not record.exact:
                    self.bump(name)  # W − ΔW_old + ΔW_new: rounded
                record.merged_with = {k: v.clone() for k, v in record.factors.items()}
                record.rounding = EPS[self.dtype]
                self.lossy += 1
            elif merge_all:
                self._merged(name, exact)

    @precondition(lambda self: self.any_adapters())
    @rule(data=st.data(), strict=st.booleans(), wide=st.booleans())
    def load_adapter_state(self, data, strict, wide):
        state = self.random_state(wide=wide)
        if not strict:
            keys = data.draw(st.sets(st.sampled_from(sorted(state)), min_size=1))
            state = {k: state[k] for k in keys}
        touched = {self._split(k)[0] for k in state}
        merged = [n for n in touched if self.records[n].merged_with is not None]
        if self.blocked(merged):
            self.refused(lambda: lnn.load_adapter_state_dict(self.model, state, strict=strict))
            return
        lnn.load_adapter_state_dict(self.model, state, strict=strict)
        self._loaded(self.stored(state), merge_all=False, exact=False)

    @precondition(lambda self: self.any_adapters())
    @rule(dtype=st.sampled_from(sorted(DTYPES)))
    def to_dtype(self, dtype):
        """The live model converted in place, merged or not."""
        dtype = DTYPES[dtype]
        # every value of the model's dtype is one of `dtype`'s only into a wider float
        # (bfloat16 into float16 loses range: small entries become subnormals)
        wider = dtype == torch.float64 or (dtype == torch.float32 and self.dtype != torch.float64)
        narrower = dtype != self.dtype and not wider
        self.model.to(dtype)
        self.plain = self.plain.to(dtype).double() if narrower else self.plain
        for _, options in self.injects:
            options.pop("factor_dtype", None)  # converted with the rest
        for record in self.records.values():
            record.factor_dtype = dtype
            record.factors = {k: v.to(dtype).double() for k, v in record.factors.items()}
            if narrower:
                record.weight = record.weight.to(dtype).double()
                self.lossy += 1
                if record.merged_with is not None:
                    # W + ΔW rounded to the new dtype: an unmerge gives W up to its ulps
                    size = float(effective(record, record.merged_with).abs().max())
                    record.drift += 2 * EPS[dtype] * size
                    record.rounding = max(record.rounding, EPS[dtype])
                    record.bits = None
            if record.bits is not None:
                record.bits = record.bits.to(dtype)
        self.dtype = dtype
        self.coarsest = max(self.coarsest, dtype, key=lambda d: EPS[d])

    @precondition(lambda self: self.any_adapters())
    @rule()
    def deep_copy(self):
        """A copy computes the same; changing it leaves the model as it was."""
        before = snapshot(self.model)
        other = copy.deepcopy(self.model)
        with torch.no_grad():
            self.close_output(other.eval()(self.typed()), self.reference_output(), "copy")
        lnn.unmerge(other)
        with torch.no_grad():
            for adapter in lnn.adapters(other).values():
                for t in adapter.adapter_tensors().values():
                    t.mul_(-1.5)
        lnn.merge(other) if not self.blocked() else None
        same(before, snapshot(self.model))

    @precondition(lambda self: self.any_adapters())
    @rule()
    def train_eval(self):
        mode = not self.model.training
        self.model.train(mode)
        for name, adapter in self.adapters().items():
            assert adapter.training == mode, name

    @precondition(lambda self: self.any_adapters())
    @rule(lr=st.sampled_from([0.01, 0.1]), decay=st.sampled_from([0.0, 0.1]))
    def optimizer_step(self, lr, decay):
        """One step on every trainable tensor: only the adapters' train, the base stays."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        own = {id(t) for a in self.adapters().values() for t in a.adapter_tensors().values()}
        assert {id(p) for p in trainable} <= own
        if not trainable:
            return
        optimizer = torch.optim.SGD(trainable, lr=lr, weight_decay=decay)
        base = {n: p.detach().clone() for n, p in self.model.named_parameters()
                if not p.requires_grad}  # fmt: skip
        out = self.model(self.typed())
        if not out.requires_grad:
            return  # every adapter merged: nothing to train through
        probe = torch.randn(out.shape, generator=self.generator, dtype=torch.float64)
        (out.double() * probe).mean().backward()
        optimizer.step()
        for name, p in self.model.named_parameters():
            if name in base:
                assert p.grad is None, name
                assert torch.equal(p, base[name]), name
        for name, adapter in self.adapters().items():
            record = self.records[name]
            for key, t in adapter.adapter_tensors().items():
                if record.merged_with is not None:
                    assert t.grad is None, (name, key)
                record.factors[key] = t.detach().double().clone()
        optimizer.zero_grad(set_to_none=True)

    @precondition(lambda self: self.any_adapters() and self.dtype != torch.bfloat16)
    @rule()
    def gradients(self):
        """The factors' gradients equal float64 autograd of the reference (eval mode: no
        dropout); merged adapters get none."""
        was = self.model.training
        self.model.eval()
        for t in self.model.parameters():
            t.grad = None
        out = self.model(self.typed())
        probe = torch.randn(out.shape, generator=self.generator, dtype=torch.float64)
        if out.requires_grad:
            (out.double() * probe).sum().backward()
        self.model.train(was)
        leaves = {}
        records = {}
        for name, record in self.records.items():
            record = record.copy()
            if record.merged_with is None:
                record.factors = {k: v.clone().requires_grad_() for k, v in record.factors.items()}
                leaves[name] = record.factors
            records[name] = record
        reference = copy.deepcopy(self.plain).eval()
        for name, record in records.items():
            module = reference.get_submodule(name)
            del module.weight  # a computed weight, differentiable in the factors
            module.weight = current_weight(record)
        want = reference(self.typed(torch.float64))
        if leaves:
            (want * probe).sum().backward()
        for name, adapter in self.adapters().items():
            for key, t in adapter.adapter_tensors().items():
                if name not in leaves:
                    assert t.grad is None, (name, key)
                    continue
                padded = getattr(adapter, "padding_idx", None) is not None and not adapter.hard
                if padded and key in ("up", "scale"):
                    continue  # the branch passes these a gradient from the padding row, as PEFT's
                expected = leaves[name][key].grad
                assert t.grad is not None, (name, key)
                scale = float(expected.abs().max()) + 1e-8
                err = float((t.grad.double() - expected).abs().max())
                assert err <= 50 * self.tolerance() * scale, (name, key, err, scale)
                t.grad = None

    @precondition(lambda self: self.any_adapters())
    @rule()
    def plain_state_into_the_model(self):
        """A state of the un-adapted model loads into the base layers: unmerged, the
        factors as they were."""
        state = {k: v.to(self.dtype) for k, v in self.plain.state_dict().items()}
        self.model.load_state_dict(state)
        for record in self.records.values():
            record.merged_with, record.exact, record.drift = None, False, 0.0
            record.bits = record.weight.to(self.dtype)

    @precondition(lambda self: self.any_adapters())
    @rule(extra=st.booleans())
    def factors_through_load_state_dict(self, extra):
        """Factors alone (and the saved states) through `load_state_dict(strict=False)`:
        loaded beside unmerged adapters; refused where one is merged, whose weight would
        keep the old ΔW."""
        state = self.random_state()
        if extra:
            state.update({k: v for k, v in self.model.state_dict().items()
                          if k.endswith("._extra_state")})  # fmt: skip
        if any(r.merged_with is not None for r in self.records.values()):
            self.refused(lambda: self.model.load_state_dict(state, strict=False))
            return
        self.model.load_state_dict(state, strict=False)
        self._loaded({k: v for k, v in state.items() if not k.endswith("._extra_state")},
                     merge_all=False, exact=False)  # fmt: skip

    @precondition(lambda self: self.any_adapters())
    @rule(how=st.sampled_from(["adapter", "whole", "tied"]))
    def into_a_fresh_model(self, how):
        """The adapters' state (or the whole state) loaded into a fresh model injected
        alike: the adapter state beside the base W, the whole state as the model. A merged
        state of a layer the model no longer ties (`reload_own_state`, `to_dtype`) into a
        fresh model that ties it (`tied`) is refused: it would write W + ΔW into both."""
        fresh = copy.deepcopy(self.plain).to(self.dtype)
        untied = tied_names(self.plain) - tied_names(self.model)
        if how == "tied":
            if not any(self.records[n].merged_with is not None
                       for n in untied if n in self.records):  # fmt: skip
                return
            for targets, options in self.injects:
                lnn.inject(fresh, targets, **options)
            before = snapshot(fresh)
            with pytest.raises(StateDictError, match="tied"):
                fresh.load_state_dict(copy.deepcopy(self.model.state_dict()))
            same(before, snapshot(fresh))
            return
        for name in untied:  # untied as the model is
            module = fresh.get_submodule(name)
            module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        for targets, options in self.injects:
            lnn.inject(fresh, targets, **options)
        if how == "adapter":
            state = {k: v.clone() for k, v in lnn.adapter_state_dict(self.model).items()}
            lnn.load_adapter_state_dict(fresh, state)
            records = {}
            for name, record in self.records.items():
                record = record.copy()
                record.merged_with, record.drift = None, 0.0
                records[name] = record
            want = self.reference_output(records)
        else:
            with torch.no_grad():  # nothing in common with the model
                for p in fresh.parameters():
                    p.copy_(torch.randn_like(p))
            fresh.load_state_dict(copy.deepcopy(self.model.state_dict()))
            want = self.reference_output()
            for name, adapter in lnn.adapters(fresh).items():
                assert adapter.merged == (self.records[name].merged_with is not None), name
        with torch.no_grad():
            self.close_output(fresh.eval()(self.typed()), want, f"fresh {how}")

    @precondition(lambda self: self.any_adapters() and not any(
        r.dora and r.merged_with is not None for r in self.records.values()))
    @rule(assign=st.booleans())
    def reload_own_state(self, assign):
        """The model's own whole state (a copy) loaded back, `assign` or not: the same model,
        a merged adapter's factors those it merged, and no kept copy of W."""
        state = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(state, assign=assign)
        for name, record in self.records.items():
            if record.merged_with is not None:
                # saved in the factors' dtype (merged in a wider one before a `to`, rounded)
                rounded = {k: v.to(record.factor_dtype).double()
                           for k, v in record.merged_with.items()}  # fmt: skip
                if any(not torch.equal(rounded[k], v) for k, v in record.merged_with.items()):
                    size = float(effective(record, record.merged_with).abs().max())
                    record.drift += 8 * EPS[record.factor_dtype] * size
                record.factors = rounded
                record.merged_with = {k: v.clone() for k, v in rounded.items()}
                record.exact = False
            record.bits = state[f"{name}.base.weight"].clone()

    @precondition(lambda self: self.any_adapters())
    @rule(exact=st.booleans())
    def merge_and_unload(self, exact):
        if self.blocked([n for n, r in self.records.items() if r.merged_with is None]):
            self.refused(lambda: lnn.merge_and_unload(self.model), MergeError)
            return
        if exact:
            lnn.merge(self.model, exact=True)
            for name in self.records:
                self._merged(name, True)
        want = self.reference_output({n: self._merged_record(r) for n, r in self.records.items()})
        plain = lnn.merge_and_unload(self.model)
        assert plain is self.model
        for name in self.records:
            self._merged(name, False)
        self._now_plain(merged=True)
        with torch.no_grad():
            self.close_output(self.model(self.typed()), want, "merge_and_unload")

    def _merged_record(self, record: Record) -> Record:
        record = record.copy()
        if record.merged_with is None:
            record.merged_with = {k: v.clone() for k, v in record.factors.items()}
        return record

    @precondition(lambda self: self.any_adapters())
    @rule()
    def unload(self):
        for name in self.records:
            self._unmerged(name)
        lnn.unload(self.model)
        self._now_plain(merged=False)
        with torch.no_grad():
            self.close_output(self.model(self.typed()), self.reference_output(), "unload")

    def _now_plain(self, merged: bool) -> None:
        """After `merge_and_unload` / `unload`: plain modules, the base frozen as `inject` left
        it; the reference takes the weights it now holds (checked against the record)."""
        assert not self.adapters()
        for name in tied_names(self.plain) - tied_names(self.model):  # untied as the model is
            module = self.plain.get_submodule(name)
            module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        for name, record in self.records.items():
            module = self.model.get_submodule(name)
            assert not isinstance(module, lnn.LowRankAdapter), name
            assert type(module) is type(self.plain.get_submodule(name)), name
            assert not any(p.requires_grad for p in module.parameters()), name
            assert not any(isinstance(m, lnn.LowRankAdapter) for m in module.modules()), name
            want = effective(record, record.merged_with) if merged else record.weight
            got = module.weight.detach().double()
            scale = float(want.abs().max())
            err = float((got - want).abs().max())
            rounding = max(record.rounding, EPS[self.dtype]) if merged else EPS[self.dtype]
            assert err <= 16 * rounding * scale + 2 * record.drift, (name, err)
            if not merged and record.bits is not None:
                assert torch.equal(module.weight, record.bits), name
            with torch.no_grad():
                self.plain.get_submodule(name).weight.copy_(got)
        self.unloaded = True
        self.records = {}
        self.injects = []
        self.lossy += 1

    @precondition(lambda self: self.unloaded)
    @rule(data=st.data())
    def inject_again(self, data):
        """A plain model given back takes new adapters."""
        self.model.requires_grad_(False)
        self.unloaded = False
        self._inject(data)

    @precondition(lambda self: self.any_adapters())
    @rule(data=st.data(), swap=st.booleans())
    def own_tensors_under_other_keys(self, data, swap):
        """The model's own adapter tensors (sharing their memory) loaded under other keys of
        the same shapes: each adapter gets the values the others held before the load."""
        own = lnn.adapter_state_dict(self.model)
        keys = sorted(k for k in own if not k.endswith(".residual"))
        order = data.draw(st.permutations(keys))
        state = {}
        for key, source in zip(keys, order, strict=True):
            fits = own[source].shape == own[key].shape
            state[key] = own[source] if fits else own[key]
        values = {k: v.clone() for k, v in state.items()}
        if swap and self.blocked():
            self.refused(lambda: lnn.swap_adapter(self.model, state), MergeError)
            return
        if swap:
            lnn.swap_adapter(self.model, state)
        else:
            lnn.load_adapter_state_dict(self.model, state)
        self._loaded(values, merge_all=swap, exact=False)

    # --- refusals ----------------------------------------------------------------------

    @precondition(lambda self: self.any_adapters())
    @rule(how=st.sampled_from(["nan", "inf", "shape", "extra", "missing", "int", "scalar",
                               "huge"]), swap=st.booleans(), data=st.data())  # fmt: skip
    def bad_adapter_state(self, how, swap, data):
        state = self.random_state()
        key = data.draw(st.sampled_from(sorted(state)))
        if how in ("nan", "inf"):
            state[key] = state[key].clone()
            state[key].view(-1)[-1] = float(how)
        elif how == "shape":
            state[key] = torch.zeros(*state[key].shape, 2, dtype=state[key].dtype)
        elif how == "extra":
            state[key.rpartition(".")[0] + ".lora_A"] = torch.zeros(2)
        elif how == "missing":
            del state[key]
        elif how == "int":
            state[key] = state[key].to(torch.int64)
        elif how == "huge":
            state[key] = torch.full(state[key].shape, 1e300, dtype=torch.float64)
            if self.dtype == torch.float64:
                state[key] = state[key] * float("inf")
        else:
            state[key] = 3.0
        if swap:
            self.refused(lambda: lnn.swap_adapter(self.model, state))
        else:
            self.refused(lambda: lnn.load_adapter_state_dict(self.model, state, strict=True))

    @precondition(lambda self: self.any_adapters())
    @rule(data=st.data(), value=st.sampled_from([float("nan"), float("inf")]),
          call=st.sampled_from(["merge", "merge_one", "merge_and_unload", "swap_own"]))  # fmt: skip
    def non_finite_factor(self, data, value, call):
        """A factor turned NaN/Inf in place: merging it is refused, nothing written."""
        name = data.draw(st.sampled_from(sorted(self.records)))
        adapter = self.model.get_submodule(name)
        if adapter.merged:
            return
        factor = next(iter(adapter.factor_tensors().values()))
        kept = factor.detach().clone()
        with torch.no_grad():
            factor.view(-1)[0] = value
        try:
            run = {"merge": lambda: lnn.merge(self.model), "merge_one": adapter.merge,
                   "merge_and_unload": lambda: lnn.merge_and_unload(self.model),
                   "swap_own": lambda: lnn.swap_adapter(self.model,
                                                        lnn.adapter_state_dict(self.model))}
            self.refused(run[call])
        finally:
            with torch.no_grad():
                factor.copy_(kept)

    @precondition(lambda self: self.any_adapters())
    @rule(change=st.sampled_from(["rank", "alpha", "form", "dora", "peft"]))
    def state_of_another_model(self, change):
        """A whole state of a model injected otherwise is refused by `load_state_dict`."""
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        name = sorted(self.records)[0]
        prefix = f"{name}."
        adapter = self.model.get_submodule(name)
        keys = [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "base.")
                and k[len(prefix):] in adapter.adapter_tensors()]  # fmt: skip
        if change == "rank":
            key = keys[0]
            state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1,
                                     dtype=state[key].dtype)  # fmt: skip
        elif change == "alpha":
            extra = state[prefix + "_extra_state"].clone()
            if extra[2] == 1:  # a trainable scale's state: any scale loads
                return
            extra[3] = extra[3] * 2 + 1
            state[prefix + "_extra_state"] = extra
        elif change == "form":
            state[prefix + "mid" if adapter.form != "tucker2" else prefix + "out_factor"] = (
                torch.zeros(2, 2))
        elif change == "dora":
            if adapter.dora:
                return
            state[prefix + "magnitude"] = torch.ones(3)
        else:
            state[prefix + "lora_A.default.weight"] = torch.zeros(2, 2)
        self.refused(lambda: self.model.load_state_dict(state))

    @precondition(lambda self: self.any_adapters())
    @rule(case=st.sampled_from(["again", "inside", "missing", "rank", "alpha", "dropout"]))
    def bad_inject(self, case):
        name = sorted(self.records)[0]
        targets, settings = {
            "again": ([name], {"rank": 2}),
            "inside": ([name + ".base"], {"rank": 2}),
            "missing": (["nothing.here"], {"rank": 2}),
            "rank": ([name], {"rank": 0}),
            "alpha": ([name], {"rank": 2, "alpha": float("nan")}),
            "dropout": ([name], {"rank": 2, "dropout": 1.5}),
        }[case]
        self.refused(lambda: lnn.inject(self.model, targets, **settings))

    @precondition(lambda self: not self.unloaded and len(self._candidates()) >= 2)
    @rule(data=st.data(), case=st.sampled_from(["rank", "dropout", "hard", "dora", "factors",
                                                "pissa", "form"]))  # fmt: skip
    def bad_inject_beside_a_good_one(self, data, case):
        """One target that cannot be beside one that can: nothing is injected."""
        candidates = self._candidates()
        good, bad = data.draw(st.permutations(sorted(candidates)))[:2]
        module = self.model.get_submodule(bad)
        embedding = isinstance(module, nn.Embedding)
        conv = isinstance(module, nn.Conv1d)
        entry = {
            "rank": {"r": 0},
            "dropout": {"dropout": 1.0},
            "hard": {"hard": True, "dropout": 0.2},
            "dora": {"dora": True, "form": "cp"},
            "factors": {},
            "pissa": {"init": "pissa"} if conv and module.groups > 1 else {"r": -1},
            "form": {"form": "centre_tap"} if conv and module.groups > 1 else {"form": "x"},
        }[case]
        if embedding and case == "dropout":
            entry = {"dropout": 0.1}  # an embedding takes no dropout
        targets = {good: {}, bad: entry}
        extra = {"factors": {"nothing.here": None}} if case == "factors" else {}
        self.refused(lambda: lnn.inject(self.model, targets, rank=2, **extra))

    @precondition(lambda self: self.any_adapters() and self.dtype == torch.float16)
    @rule(data=st.data(), swap=st.booleans())
    def overflowing_update(self, data, swap):
        """Factors finite in float16 whose W + ΔW is not: merging them is refused."""
        name = data.draw(st.sampled_from(sorted(self.records)))
        record = self.records[name]
        if record.dora or (not swap and record.merged_with is None):
            return
        state = self.random_state()
        for key in state:
            if self._split(key)[0] == name and not key.endswith(("scale", "magnitude")):
                state[key] = torch.full_like(state[key], 300.0)
        call = lnn.swap_adapter if swap else lnn.load_adapter_state_dict
        self.refused(lambda: call(self.model, state))

    @precondition(lambda self: self.kind == "encoder" and not self.unloaded
                  and "layer.self_attn.out_proj" not in self.records)  # fmt: skip
    @rule()
    def dropout_on_attention_output(self):
        """`nn.MultiheadAttention` reads `out_proj.weight`: dropout cannot apply there."""
        self.refused(lambda: lnn.inject(self.model, ["layer.self_attn.out_proj"], rank=2,
                                        dropout=0.1))  # fmt: skip

    # --- PEFT --------------------------------------------------------------------------

    @precondition(lambda self: self.any_adapters() and self.kind in ("llama", "gpt2"))
    @rule()
    def compare_with_peft(self):
        """PEFT, given the same base weights and factors, computes the same forward and
        merges to the same weights."""
        peft = pytest.importorskip("peft")
        records = self.records
        if any(r.form != "lora" or r.scale is None for r in records.values()):
            return
        if any(n in tied_names(self.plain) for n in records):
            return
        base = copy.deepcopy(self.plain).double()
        inner = base.lm
        dora = {n for n, r in records.items() if r.dora}
        if dora and len(dora) != len(records):
            return  # PEFT's use_dora is one for every layer
        # each layer's own rank and scale (PEFT's scale is alpha / r)
        ranks = {n.removeprefix("lm."): r.factors["up"].shape[1] for n, r in records.items()}
        alphas = {n.removeprefix("lm."): r.scale * ranks[n.removeprefix("lm.")]
                  for n, r in records.items()}  # fmt: skip
        config = peft.LoraConfig(r=1, target_modules=sorted(ranks), rank_pattern=ranks,
                                 alpha_pattern=alphas, use_dora=bool(dora),
                                 fan_in_fan_out=self.kind == "gpt2", lora_dropout=0.0,
                                 init_lora_weights=False)  # fmt: skip
        model = peft.get_peft_model(inner, config)
        with torch.no_grad():
            for name, record in records.items():
                used = record.merged_with if record.merged_with is not None else record.factors
                layer = model.base_model.model.get_submodule(name.removeprefix("lm."))
                if isinstance(layer.base_layer, nn.Embedding):
                    layer.lora_embedding_A["default"].copy_(used["down"])
                    layer.lora_embedding_B["default"].copy_(used["up"])
                else:
                    layer.lora_A["default"].weight.copy_(used["down"])
                    layer.lora_B["default"].weight.copy_(used["up"])
                if record.dora:
                    layer.lora_magnitude_vector["default"].weight.copy_(used["magnitude"])
        model.eval()
        with torch.no_grad():
            peft_out = model(input_ids=self.typed()).logits
            self.close_output(peft_out, self.reference_output(), "peft vs reference",
                              dtype=torch.float64)
            was = self.model.training
            self.model.eval()
            self.close_output(self.model(self.typed()), peft_out, "model vs peft")
            self.model.train(was)
            dense = model.merge_and_unload()
            for name, record in records.items():
                got = dense.get_submodule(name.removeprefix("lm.")).weight
                want = current_weight(record)
                err = float((got - want).abs().max())
                assert err <= 1e-9 * float(want.abs().max()), (name, err)

    # --- checks ------------------------------------------------------------------------

    @invariant()
    def matches_the_reference(self):
        if not hasattr(self, "model"):
            return
        adapters = self.adapters()
        assert set(adapters) == (set() if self.unloaded else set(self.records))
        own = set()
        for name, adapter in adapters.items():
            record = self.records[name]
            assert adapter.merged == (record.merged_with is not None), name
            assert (adapter.base_copy is not None) == record.exact, name
            for key, t in adapter.adapter_tensors().items():
                own.add(id(t))
                assert t.dtype == record.factor_dtype, (name, key)
                assert torch.equal(t.double(), record.factors[key]), (name, key)
                assert t.requires_grad, (name, key)
            weight = adapter.base.weight
            assert weight.dtype == self.dtype, name
            if record.merged_with is None and record.bits is not None:
                assert torch.equal(weight, record.bits), f"{name}: W not bit-exact"
            want = current_weight(record)
            err = float((adapter.weight.detach().double() - want).abs().max())
            scale = float(want.abs().max())
            rounding = max(record.rounding, EPS[self.dtype]) if record.merged_with is not None \
                else EPS[self.dtype]
            assert err <= 8 * rounding * scale * (1 + self.lossy) + 4 * record.drift, (
                name, err)
        trainable = {id(p) for p in self.model.parameters() if p.requires_grad}
        assert trainable == own
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.close_output(self.model(self.typed()), self.reference_output(), "output")
        finally:
            self.model.train(was)


TestModelMachine, _long = machine_tests(ModelMachine, 4, 8, 30)
test_model_machine_long_sequences = pytest.mark.exhaustive(_long)
