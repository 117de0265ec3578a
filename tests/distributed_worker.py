"""The two-process side of `test_nn_distributed`: train an injected model for 3 steps under
DistributedDataParallel and under FSDP2 (`fully_shard`) in a gloo group on loopback, and save
the losses, the adapter gradients and the merged dense model of each."""

from __future__ import annotations

import faulthandler
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from lowrank import nn as lnn
from lowrank.errors import LowRankError, StateDictError
from lowrank.forms import LoRA
from lowrank.io import Adapter, apply_adapter, model_adapter

STEPS = 3
SAMPLES = 8


ADAPTED = (0, 3, 4, 5)


def make_model() -> nn.Module:
    """A tiny CNN with a Tucker2 adapter on its conv, LoRA with a trainable scale on its
    first linear layer (a one-element parameter: FSDP2 takes no 0-d one) and LoRA on two
    more linear layers of one shape (sharded weights of one shape are no tie)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5), nn.Linear(5, 5), nn.Linear(5, 5))  # fmt: skip
    lnn.inject(model, {"0": {"r": [2, 2], "form": "tucker2"},
                       "3": {"r": 2, "alpha": 4, "trainable_scale": True},
                       "4": {"r": 2}, "5": {"r": 2}})  # fmt: skip
    return randomized(model)


def randomized(model: nn.Module) -> nn.Module:
    """`model` with every trainable parameter drawn anew, the same on every rank."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model


UNEVEN = {"conv": {"r": 3}, "tap": {"r": 3, "form": "centre_tap", "trainable_scale": True},
          "tucker": {"r": [3, 2], "form": "tucker2"}, "embedding": {"r": 3, "alpha": 6},
          "gpt2": {"r": 3, "trainable_scale": True}}  # fmt: skip


class Uneven(nn.Module):
    """Conv adapters of every conv form, an embedding's and a transformers `Conv1D`'s, of
    ranks (3) and sizes (5, 7) that 2 ranks shard unevenly."""

    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.conv, self.tap = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 5, 3, padding=1)
        self.tucker = nn.Conv2d(5, 6, 3, padding=1)
        self.embedding, self.gpt2 = nn.Embedding(7, 5), Conv1D(7, 5)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        features = self.tucker(F.relu(self.tap(F.relu(self.conv(image))))).mean((2, 3))
        return features[:, :1] + self.gpt2(self.embedding(ids).mean(1))


def make_uneven() -> nn.Module:
    torch.manual_seed(0)
    model = Uneven()
    lnn.inject(model, UNEVEN)
    return randomized(model)


def uneven_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 4, 4, generator=generator), torch.randint(7, (2, 3),
                                                                       generator=generator)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(SAMPLES, 3, 4, 4, generator=generator), torch.randn(SAMPLES, 5,
                                                                           generator=generator)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (FSDP2), a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, world: int) -> dict:
    """3 SGD steps on the adapter parameters alone; mean loss over all ranks and every adapter
    gradient (whole) after each backward."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=0.1)
    losses, grads = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / world)
        grads.append({n.removeprefix("module."): full(p.grad).clone() for n, p in trainable})
        optimizer.step()
    return {"losses": losses, "grads": grads, "trainable": [n for n, _ in trainable]}


def merged_dense(model: nn.Module) -> dict[str, torch.Tensor]:
    """The dense model `merge_and_unload` gives, as a state dict."""
    return {k: v.clone() for k, v in lnn.merge_and_unload(model).state_dict().items()}


def adapter_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{layer: ΔW}` of the file `lowrank.io.model_adapter` makes of `model` (on every rank:
    sharded factors are gathered)."""
    return {name: form.to_dense() for name, form in model_adapter(model).items()}


def single_process() -> dict:
    """The reference: one process, the whole batch."""
    model = make_model()
    x, y = data()
    result = train(model, x, y, 1)
    result["adapter"] = adapter_deltas(model)
    result["dense"] = merged_dense(model)
    return result


def uneven(inputs: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Under FSDP2, factors sharded unevenly: `merge` (the whole merged weights), a
    `swap_adapter` of the model's state with its factors × 1.5 (the whole weights, and the
    output), `adapter_state_dict` after a forward without gradients (the kinds of its
    tensors, and the values of the shards among them after the next reshard), each
    adapter's `factors()` (its scale and ΔW) and its `weight` (`effective_weights`)."""
    model = make_uneven()
    for name in ("conv", "tap", "tucker", "embedding"):  # the Conv1D in the root group
        fully_shard(getattr(model, name))
    fully_shard(model)
    state = lnn.adapter_state_dict(model)
    swapped = {key: value * (1 if key.endswith("scale") else 1.5) for key, value in state.items()}
    result: dict = {"error": None}
    try:
        lnn.merge(model)
        result["merged"] = {n: full(getattr(model, n).base.weight).clone() for n in UNEVEN}
        lnn.swap_adapter(model, swapped)
        result["swapped"] = {n: full(getattr(model, n).base.weight).clone() for n in UNEVEN}
        lnn.unmerge(model)
    except Exception as err:  # on every rank alike; the test shows it
        result["error"] = f"{type(err).__name__}: {err}"
    with torch.no_grad():  # leaves the root group's parameters unsharded
        result["output"] = model(*inputs).clone()
    after = lnn.adapter_state_dict(model)
    result["kinds"] = {key: type(value).__name__ for key, value in after.items()}
    model.reshard()  # frees the full-size copies: plain tensors over them are not read
    result["state"] = {key: full(value).clone() for key, value in after.items()
                       if type(value) is not torch.Tensor}  # fmt: skip
    forms = {name: getattr(model, name).factors() for name in UNEVEN}
    result["forms"] = {name: (form.scale, form.to_dense()) for name, form in forms.items()}
    result.update(effective_weights(model))
    model.reshard()
    bases = [getattr(model, name).base.weight for name in UNEVEN]
    result["copy_bytes"] = (  # this rank's shards of the weights
        lnn.merge(model, exact=True),
        sum(w.to_local().numel() * w.element_size() for w in bases),
        sum(w.numel() * w.element_size() for w in bases),
    )
    lnn.unmerge(model)
    return result


DORA = (0, 3, 4, 5)


def make_dora() -> nn.Module:
    """DoRA adapters (rank 3, sharded unevenly on 2 ranks) on a conv, two linear layers and
    a transformers `Conv1D` (weight `(in, out)`, its norm per column), magnitudes drawn
    apart from ‖W + ΔW‖."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5), nn.Linear(5, 7), Conv1D(5, 7))  # fmt: skip
    lnn.inject(model, [str(i) for i in DORA], rank=3, dora=True)
    randomized(model)
    with torch.no_grad():
        for i in DORA:
            model[i].magnitude.add_(1.0)
    return model


def dora_results(model: nn.Module, x: torch.Tensor) -> dict:
    """After training: the whole merged weights, the merged output, the whole weights after
    `unmerge`, each adapter's `weight` with the gradients of the sum of their squares in its
    magnitude, and the whole weights after a `swap_adapter` of the state × 1.5 and after
    the `unmerge` that follows it."""
    result: dict = {"error": None}
    try:
        lnn.merge(model)
        result["merged"] = {i: full(model[i].base.weight).clone() for i in DORA}
        with torch.no_grad():
            result["output"] = model(x).clone()
        lnn.unmerge(model)
        result["unmerged"] = {i: full(model[i].base.weight).clone() for i in DORA}
        model.zero_grad(set_to_none=True)
        weights = {i: full(model[i].weight) for i in DORA}
        sum(weight.square().sum() for weight in weights.values()).backward()
        result["weights"] = {i: w.detach().clone() for i, w in weights.items()}
        result["magnitude_grads"] = {i: full(model[i].magnitude.grad).clone() for i in DORA}
        state = lnn.adapter_state_dict(model)
        lnn.swap_adapter(model, {key: 1.5 * value for key, value in state.items()})
        result["swapped"] = {i: full(model[i].base.weight).clone() for i in DORA}
        lnn.unmerge(model)
        result["unswapped"] = {i: full(model[i].base.weight).clone() for i in DORA}
    except Exception as err:  # on every rank alike; the test shows it
        result["error"] = f"{type(err).__name__}: {err}"
    return result


def dora(x: torch.Tensor, y: torch.Tensor, shard: slice, world: int) -> dict:
    """DoRA adapters trained 3 steps under DistributedDataParallel and under FSDP2 (the
    `train` results), then `dora_results` of the sharded model."""
    results = {"ddp": train(DistributedDataParallel(make_dora()), x[shard], y[shard], world)}
    model = make_dora()
    for i in (0, 3, 5):  # 4 in the root group
        fully_shard(model[i])
    fully_shard(model)
    results["fsdp"] = train(model, x[shard], y[shard], world)
    results["fsdp"].update(dora_results(model, x))
    return results


def single_dora() -> dict:
    """The reference of `dora`: one process, the whole batch."""
    model = make_dora()
    x, y = data()
    result = train(model, x, y, 1)
    result["bases"] = {i: model[i].base.weight.clone() for i in DORA}
    result.update(dora_results(model, x))
    return result


def effective_weights(model: nn.Module) -> dict:
    """Each adapter's `weight` (W + ΔW, outside the forward: sharded where the model is),
    whole, and the gradients of the sum of their squares."""
    weights = {name: full(getattr(model, name).weight) for name in UNEVEN}
    sum(weight.square().sum() for weight in weights.values()).backward()
    grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"weights": {n: w.detach().clone() for n, w in weights.items()}, "grads": grads}


def hard_on_a_sharded_base() -> tuple[str, str] | torch.Tensor:
    """A `hard=True` adapter whose base layer `fully_shard` sharded itself: the refusal
    (type and message), or the output where it ran."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lnn.inject(model, ["0"], rank=2, hard=True)
    with torch.no_grad():
        model[0].up.fill_(0.5)  # ΔW ≠ 0
    fully_shard(model[0].base)
    fully_shard(model)
    try:
        with torch.no_grad():
            return model(torch.ones(2, 4)).clone()
    except LowRankError as err:
        return type(err).__name__, str(err)


def dora_on_a_sharded_base() -> tuple[str, str] | torch.Tensor:
    """A DoRA adapter whose base layer `fully_shard` sharded itself: the error of its
    forward (type and message), or the output where it ran."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lnn.inject(model, ["0"], rank=2, dora=True)
    fully_shard(model[0].base)
    fully_shard(model)
    try:
        with torch.no_grad():
            return model(torch.ones(2, 4)).clone()
    except Exception as err:  # on every rank alike; the test shows it
        return type(err).__name__, str(err)


def unload_sharded_adapters(x: torch.Tensor) -> dict:
    """`merge_and_unload` and `unload` of a model whose adapters `fully_shard` sharded
    themselves: the refusals (type and message, None where a call ran), whether the
    adapters are still in place and unmerged, and the model's output on `x` after them (the
    exception's type where the forward failed)."""
    model = make_model()
    for i in ADAPTED:
        fully_shard(model[i])
    fully_shard(model)
    refusals: list[tuple[str, str] | None] = []
    for call in (lnn.merge_and_unload, lnn.unload):
        try:
            call(model)
            refusals.append(None)
        except LowRankError as err:
            refusals.append((type(err).__name__, str(err)))
    kept = all(isinstance(model[i], lnn.LowRankAdapter) and not model[i].merged for i in ADAPTED)
    try:  # on every rank alike
        with torch.no_grad():
            output: torch.Tensor | str = model(x).clone()
    except Exception as err:
        output = type(err).__name__
    return {"refusals": refusals, "kept": kept, "output": output}


def inject_after_wrapping() -> dict[str, tuple[str, str, bool] | None]:
    """`inject` into a model that DistributedDataParallel or `fully_shard` wrapped already,
    and into a part of a sharded model: per case the refusal (type, message, whether the
    model is unchanged: no adapter, every parameter trainable still), None where it ran."""

    def plain() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(5, 6)), nn.ReLU(), nn.Linear(6, 5))

    sharded = plain()
    fully_shard(sharded[2])
    fully_shard(sharded)
    cases = {"ddp": (DistributedDataParallel(plain()), ["module.2"]),
             "fsdp": (sharded, ["2"]), "part": (sharded[0], ["0"])}  # fmt: skip
    result: dict[str, tuple[str, str, bool] | None] = {}
    for case, (model, targets) in cases.items():
        try:
            lnn.inject(model, targets, rank=2)
            result[case] = None
        except LowRankError as err:
            unchanged = not lnn.adapters(model) and all(p.requires_grad for p in model.parameters())
            result[case] = (type(err).__name__, str(err), unchanged)
    return result


def flags_after_wrapping() -> dict[str, tuple[str, str, bool] | None]:
    """`lnn.set_requires_grad` on injected models that DistributedDataParallel or
    `fully_shard` wrapped afterwards, where it would change a flag (freezing the adapters):
    per case the refusal (type, message, whether every factor still trains), None where it
    ran. Setting the flags the factors already have is a no-op there."""

    def injected() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 5))
        lnn.inject(model, ["2"], rank=2)
        return model

    sharded = injected()
    fully_shard(sharded[2])
    fully_shard(sharded)
    result: dict[str, tuple[str, str, bool] | None] = {}
    for case, model in {"ddp": DistributedDataParallel(injected()), "fsdp": sharded}.items():
        lnn.set_requires_grad(model)  # as they are: nothing to refuse
        try:
            lnn.set_requires_grad(model, False)
            result[case] = None
        except LowRankError as err:
            trains = all(t.requires_grad for a in lnn.adapters(model).values()
                         for t in a.adapter_tensors().values())  # fmt: skip
            result[case] = (type(err).__name__, str(err), trains)
    return result


def plain_pair() -> nn.Module:
    """Two linear layers of 5 and 7 rows (sharded unevenly on 2 ranks), no adapters."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 7))


def file_adapter() -> Adapter:
    """A LoRA file for `plain_pair`: scale 0.5, rank 2."""
    generator = torch.Generator().manual_seed(1)
    shapes = {"0": (6, 5), "2": (5, 7)}
    return Adapter({name: LoRA(torch.randn(2, n_in, generator=generator),
                               torch.randn(n_out, 2, generator=generator), 0.5)
                    for name, (n_in, n_out) in shapes.items()})  # fmt: skip


def apply_to_sharded(x: torch.Tensor) -> dict:
    """`apply_adapter` of `file_adapter` into `plain_pair` sharded by FSDP2 (its layer 2 a
    group of its own, layer 0 in the root group, whose weights a forward without gradients
    leaves unsharded): the error (None where it ran), the whole weights and the output on
    `x` after the next reshard."""
    model = plain_pair()
    fully_shard(model[2])
    fully_shard(model)
    with torch.no_grad():
        model(x)
    result: dict = {"error": None}
    try:  # on every rank alike
        apply_adapter(model, file_adapter())
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
    model.reshard()
    result["weights"] = {f"{i}.weight": full(model[i].weight).detach().clone() for i in (0, 2)}
    with torch.no_grad():
        result["output"] = model(x).clone()
    return result


def plain_state_into_sharded(x: torch.Tensor) -> dict:
    """`load_state_dict` of a plain model's merged state into a model sharded by FSDP2: the
    error (type and message, None where it loaded), the adapters' merged flags after it and
    the output on `x`."""
    source = make_model()
    lnn.merge(source)
    model = make_model()
    fully_shard(model[0])
    fully_shard(model[3])
    fully_shard(model)
    result: dict = {"error": None}
    try:  # on every rank alike
        model.load_state_dict(source.state_dict())
    except Exception as err:
        result["error"] = (type(err).__name__, str(err))
    result["merged"] = [adapter.merged for adapter in lnn.adapters(model).values()]
    with torch.no_grad():
        result["output"] = model(x).clone()
    return result


def single_uneven() -> dict:
    """`uneven` in one process: the merged weights, and the adapted model's output, adapter
    state, forms, effective weights and merged weights with the factors × 1.5."""
    model = make_uneven()
    lnn.merge(model)
    result = {"merged": {name: getattr(model, name).base.weight.clone() for name in UNEVEN}}
    lnn.unmerge(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not name.endswith("scale"):
                param.mul_(1.5)
        result["output"] = model(*uneven_data()).clone()
    result["state"] = {k: v.clone() for k, v in lnn.adapter_state_dict(model).items()}
    forms = {name: getattr(model, name).factors() for name in UNEVEN}
    result["forms"] = {name: (form.scale, form.to_dense()) for name, form in forms.items()}
    result.update(effective_weights(model))
    lnn.merge(model)
    result["swapped"] = {name: getattr(model, name).base.weight.clone() for name in UNEVEN}
    return result


def run(rank: int, world: int, port: int, out: str) -> None:
    faulthandler.enable(all_threads=True)  # a native abort prints every thread's stack
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    x, y = data()
    shard = slice(rank * SAMPLES // world, (rank + 1) * SAMPLES // world)
    results = {}
    model = make_model()
    results["ddp"] = train(DistributedDataParallel(model), x[shard], y[shard], world)
    results["ddp"]["dense"] = merged_dense(model)
    model = make_model()
    for layer in (model[0], model[3]):  # 4 and 5 in the root group
        fully_shard(layer)
    fully_shard(model)
    results["fsdp"] = train(model, x[shard], y[shard], world)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    gathered = get_model_state_dict(model, options=options)
    try:  # a plain state into the sharded adapters: refused before anything is written
        lnn.load_adapter_state_dict(model, lnn.adapter_state_dict(make_model()))
        results["fsdp"]["refused"] = None
    except StateDictError as err:
        results["fsdp"]["refused"] = str(err)
    with torch.no_grad():  # leaves the root group's parameters unsharded
        model(x[shard])
    lnn.merge(model)  # in place, sharded, the trainable scale too
    model.reshard()  # as FSDP2 does before the next forward with gradients
    with torch.no_grad():
        results["fsdp"]["merged_output"] = model(x).clone()
    results["fsdp"]["adapter"] = adapter_deltas(model)
    results["fsdp"]["merged"] = {f"{i}.weight": full(model[i].base.weight).clone()
                                 for i in ADAPTED}  # fmt: skip
    model.load_state_dict(model.state_dict())  # its own sharded state, trainable scale too
    with torch.no_grad():  # factors changed while merged: the state keeps the merged ones
        for name, param in model.named_parameters():
            if param.requires_grad and not name.endswith("scale"):
                param.mul_(1.5)
    changed = get_model_state_dict(model, options=options)
    sharded = nn.Sequential(nn.Linear(6, 6))
    fully_shard(sharded[0])
    fully_shard(sharded)
    before = full(sharded[0].weight).clone()
    try:  # W − ΔW₀ into a layer sharded already: refused, nothing written
        lnn.inject(sharded, ["0"], rank=2, init="pissa")
        results["fsdp"]["pissa"] = None
    except LowRankError as err:
        unchanged = torch.equal(full(sharded[0].weight), before)
        results["fsdp"]["pissa"] = (type(err).__name__, str(err), unchanged)
    results["uneven"] = uneven(uneven_data())
    results["hard"] = hard_on_a_sharded_base()
    results["unload"] = unload_sharded_adapters(x)
    results["wrapped"] = inject_after_wrapping()
    results["flags"] = flags_after_wrapping()
    results["plain_state"] = plain_state_into_sharded(x)
    results["apply"] = apply_to_sharded(x[:, 0, 0, :3].repeat(1, 2))
    results["dora"] = dora(x, y, shard, world)
    results["dora_base"] = dora_on_a_sharded_base()
    if rank == 0:
        restored = make_model()
        restored.load_state_dict(changed)
        lnn.unmerge(restored)
        results["fsdp"]["unmerged_bases"] = {
            f"{i}.weight": (restored[i].base.weight.clone(), gathered[f"{i}.base.weight"])
            for i in ADAPTED
        }
        fresh = make_model()
        fresh.load_state_dict(gathered)
        with torch.no_grad():
            results["fsdp"]["adapted_output"] = fresh(x).clone()
        results["fsdp"]["dense"] = merged_dense(fresh)
        torch.save(results, Path(out) / "results.pt")
    dist.barrier()
    dist.destroy_process_group()
