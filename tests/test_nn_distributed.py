"""An injected model trains under DistributedDataParallel and FSDP2 (`fully_shard`) in a
2-process gloo group on loopback: losses and adapter gradients over 3 steps equal the
single-process run, only adapter parameters are optimised, and `merge_and_unload` after
gathering gives the same dense model."""

from __future__ import annotations

import socket
import warnings

import distributed_worker as worker
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed gloo",
    ),
    pytest.mark.long,  # among the suite's longest modules: scheduled first
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("distributed")
    for attempt in range(2):
        try:
            mp.spawn(worker.run, args=(2, free_port(), str(out)), nprocs=2, join=True)
            break
        except mp.ProcessExitedException as err:
            # A worker killed by a signal (once seen: gloo's own SIGABRT, "terminate called
            # without an active exception") runs again, once; a Python error in a worker is
            # a ProcessRaisedException and fails at once. The workers' faulthandler has
            # printed where each thread was.
            if err.signal_name is None or attempt:
                raise
            warnings.warn(f"a distributed worker died, run again: {err}", stacklevel=1)
    return torch.load(out / "results.pt"), worker.single_process()


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_process_training_equals_the_single_process_run(runs, engine):
    distributed, reference = runs
    run = distributed[engine]
    assert run["trainable"] and all(n.rsplit(".", 1)[-1] in {"down", "mid", "up", "scale"}
                                    for n in run["trainable"])  # fmt: skip
    assert any(n.endswith("3.scale") for n in run["trainable"])
    assert [n.removeprefix("module.") for n in run["trainable"]] == reference["trainable"]
    torch.testing.assert_close(run["losses"], reference["losses"], rtol=1e-5, atol=1e-7)
    for step, expected in zip(run["grads"], reference["grads"], strict=True):
        assert step.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(step[name], grad, rtol=1e-5, atol=1e-7)
    assert run["dense"].keys() == reference["dense"].keys()
    for key, value in reference["dense"].items():
        torch.testing.assert_close(run["dense"][key], value, rtol=1e-5, atol=1e-6)


def test_sharded_adapters_merge_in_place_and_refuse_a_plain_state(runs):
    """Under FSDP2 a merge of the sharded model (its trainable scale a DTensor too) gives the
    single-process merged weights; a plain adapter state is refused, nothing written."""
    distributed, reference = runs
    run = distributed["fsdp"]
    assert run["refused"] is not None and "DTensor" in run["refused"]
    assert run["merged"].keys() == {f"{i}.weight" for i in worker.ADAPTED}
    for key, value in run["merged"].items():
        torch.testing.assert_close(value, reference["dense"][key], rtol=1e-5, atol=1e-6)


def test_a_sharded_merged_state_reloads_and_holds_the_factors_it_merged(runs):
    """A sharded model's own state did not reload (its trainable scale, a DTensor, was read
    as a 0-d one), and a merged sharded state held factors changed since the merge beside
    the weight merged with the old ones: unmerged, the base was W − 0.5 ΔW."""
    run = runs[0]["fsdp"]
    assert run["unmerged_bases"].keys() == {f"{i}.weight" for i in worker.ADAPTED}
    for restored, original in run["unmerged_bases"].values():
        torch.testing.assert_close(restored, original, rtol=1e-5, atol=1e-6)


def test_a_sharded_model_merges_after_an_inference_forward_and_writes_whole_files(runs):
    """After a forward without gradients FSDP2 keeps the root group's weights unsharded:
    full-size copies it drops at the next reshard, so a merge written there was lost (the
    adapters said merged, the output 0.99 off). Same-shaped sharded weights were taken for
    tied ones (a DTensor's data_ptr is 0). `model_adapter` gathers sharded factors."""
    distributed, reference = runs
    run = distributed["fsdp"]
    torch.testing.assert_close(run["merged_output"], run["adapted_output"], rtol=1e-5, atol=1e-6)
    assert run["adapter"].keys() == reference["adapter"].keys()
    for name, delta in reference["adapter"].items():
        torch.testing.assert_close(run["adapter"][name], delta, rtol=1e-5, atol=1e-6)


def test_pissa_into_a_layer_sharded_already_is_refused_and_writes_nothing(runs):
    """`inject(init="pissa")` after `fully_shard` took the SVD of the shard's DTensor and
    failed inside torch ("mixed torch.Tensor and DTensor"); now any inject into a layer
    sharded already is refused before anything changes."""
    refused = runs[0]["fsdp"]["pissa"]
    assert refused is not None
    kind, message, unchanged = refused
    assert kind == "TargetError" and "fully_shard" in message and unchanged


def test_unevenly_sharded_factors_merge_and_swap(runs):
    """Factors FSDP2 shards unevenly (rank 3, 5 or 7 rows, on 2 ranks) on conv (LoCon,
    centre tap, Tucker2), embedding and Conv1D adapters: `merge` computed ΔW from the
    DTensors and failed inside torch ("Cannot flatten unevenly sharded tensor")."""
    run, reference = runs[0]["uneven"], worker.single_uneven()
    assert run["error"] is None
    for part in ("merged", "swapped"):
        assert run[part].keys() == reference[part].keys()
        for name, weight in reference[part].items():
            torch.testing.assert_close(run[part][name], weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run["output"], reference["output"], rtol=1e-5, atol=1e-6)
    for part in ("weights", "grads"):  # `adapter.weight` outside the forward, and its backward
        assert run[part].keys() == reference[part].keys()
        for name, value in reference[part].items():
            torch.testing.assert_close(run[part][name], value, rtol=1e-5, atol=1e-5)


def test_adapter_state_after_an_inference_forward_holds_the_shards(runs):
    """After a forward without gradients `adapter_state_dict` gave the root group's
    full-size copies: plain tensors whose memory the next reshard freed (reading them
    crashed the process), and which `load_adapter_state_dict` and `swap_adapter` refused
    as not the sharded model's own kind."""
    run, reference = runs[0]["uneven"], worker.single_uneven()
    assert run["kinds"].keys() == reference["state"].keys()
    assert set(run["kinds"].values()) == {"DTensor"}
    for key, value in reference["state"].items():
        torch.testing.assert_close(run["state"][key], value, rtol=1e-6, atol=1e-7)


def test_a_sharded_adapter_gives_its_whole_form(runs):
    """`adapter.factors()` of a sharded adapter read a trainable scale's one element where
    one rank holds it: the other failed inside torch ("_local_scalar_dense: Empty tensor
    not supported") and the ranks' collectives went out of step; a Tucker2 form of
    unevenly sharded factors failed in `to_dense`."""
    run, reference = runs[0]["uneven"], worker.single_uneven()
    assert run["forms"].keys() == reference["forms"].keys()
    for name, (scale, delta) in reference["forms"].items():
        assert run["forms"][name][0] == pytest.approx(scale, rel=1e-6)
        torch.testing.assert_close(run["forms"][name][1], delta, rtol=1e-5, atol=1e-6)


def test_an_exact_merge_of_a_sharded_model_reports_this_ranks_bytes(runs):
    """The copies an exact merge keeps are sharded as the weights are: the bytes it reports
    are this rank's (its shards of the weights, about half), not the whole weights'."""
    reported, shards, whole = runs[0]["uneven"]["copy_bytes"]
    assert reported == shards < whole


def test_a_hard_adapter_on_a_base_layer_sharded_itself_is_refused(runs):
    """`hard=True` runs the base's own forward with W + ΔW in place of its weight; where
    `fully_shard` was applied to the base layer itself, its forward put the gathered W back
    and the output was the base layer's alone (ΔW silently dropped)."""
    refused = runs[0]["hard"]
    assert isinstance(refused, tuple), f"ran, giving {refused}"
    kind, message = refused
    assert kind == "TargetError" and "hard=True" in message and "fully_shard" in message


def test_a_model_whose_adapters_are_sharded_themselves_is_not_unloaded(runs):
    """`fully_shard` applied to the adapters themselves: their FSDP2 groups hold the base
    layers' parameters, and `merge_and_unload` / `unload` put the bases back outside every
    group, their weights shards no forward gathered (the next forward failed inside torch,
    "got mixed torch.Tensor and DTensor"). Both are refused, the model left as it was."""
    run = runs[0]["unload"]
    for refused, call in zip(run["refusals"], ("merge_and_unload", "unload"), strict=True):
        assert refused is not None, f"{call} ran"
        kind, message = refused
        assert kind == "TargetError" and call in message and "fully_shard" in message
    assert run["kept"]
    assert isinstance(run["output"], torch.Tensor), f"the forward raised {run['output']}"
    with torch.no_grad():
        expected = worker.make_model()(worker.data()[0])
    torch.testing.assert_close(run["output"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["ddp", "fsdp", "part"])
def test_inject_into_a_wrapped_model_is_refused(runs, case):
    """DistributedDataParallel and `fully_shard` take the parameters they find when they
    wrap a model: `inject` afterwards ran, and its factors trained outside the engine, their
    gradients never averaged (after 3 steps the ranks held different adapters). It is a
    `TargetError` now, the model left as it was: wrapped by DDP, sharded by FSDP2 (the model,
    and a part of it whose parameters are shards)."""
    refused = runs[0]["wrapped"][case]
    assert refused is not None, "inject ran"
    kind, message, unchanged = refused
    assert kind == "TargetError" and "inject before wrapping" in message and unchanged
    assert ("DistributedDataParallel" if case == "ddp" else "fully_shard") in message


@pytest.mark.parametrize("case", ["ddp", "fsdp"])
def test_set_requires_grad_on_a_wrapped_model_is_refused(runs, case):
    """An engine knows only the parameters it found trainable when it wrapped the model:
    changing the adapters' flags afterwards (`lnn.set_requires_grad`) is a `TargetError`
    telling to set them before wrapping, every factor left trainable."""
    refused = runs[0]["flags"][case]
    assert refused is not None, "set_requires_grad changed the flags"
    kind, message, trains = refused
    assert kind == "TargetError" and "before wrapping" in message and trains
    assert ("DistributedDataParallel" if case == "ddp" else "fully_shard") in message


def test_a_file_adapter_applies_to_a_sharded_model(runs):
    """`lowrank.io.apply_adapter` into an FSDP2-sharded model: into a group's shards it
    failed inside torch ("aten.addmm_.default got mixed torch.Tensor and DTensor"), and
    into the root group's full-size copies a forward without gradients had left, the merge
    was lost at the next reshard (the output 2.0 off). Against W + 0.5·up @ down in float64."""
    run = runs[0]["apply"]
    assert run["error"] is None
    model, adapter = worker.plain_pair(), worker.file_adapter()
    expected = {}
    for name, form in adapter.layers.items():
        weight = model.get_submodule(name).weight.detach().double()
        expected[f"{name}.weight"] = weight + 0.5 * form.up.double() @ form.down.double()
    assert run["weights"].keys() == expected.keys()
    for key, weight in expected.items():
        torch.testing.assert_close(run["weights"][key].double(), weight, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        model.load_state_dict({k: v.float() for k, v in expected.items()}, strict=False)
        x = worker.data()[0][:, 0, 0, :3].repeat(1, 2)
        torch.testing.assert_close(run["output"], model(x), rtol=1e-5, atol=1e-6)


def test_a_plain_state_into_a_sharded_model_is_refused_before_the_flags_change(runs):
    """`load_state_dict` of a plain model's merged state into an FSDP2-sharded one failed in
    torch's copy (a Tensor into a DTensor), after the adapters' load hooks had set them
    merged: their unmerged bases then ran alone, the adapters' ΔW dropped from the output.
    Refused before anything changes now, naming the key; the output is the adapted model's."""
    run = runs[0]["plain_state"]
    assert run["error"] is not None, "the plain state loaded"
    kind, message = run["error"]
    assert kind == "StateDictError" and "0.down" in message and "DTensor" in message
    assert run["merged"] == [False] * len(worker.ADAPTED)
    with torch.no_grad():
        expected = worker.make_model()(worker.data()[0])
    torch.testing.assert_close(run["output"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_dora_training_equals_the_single_process_run(runs, engine):
    """DoRA adapters (conv, linear, `Conv1D`; ranks and sizes sharded unevenly) train as in
    one process; under FSDP2 `merge`, `unmerge` and `adapter.weight` (whose per-channel
    norm spans the shards) failed inside torch ("mixed torch.Tensor and DTensor"), and now
    give the single process's weights, output and magnitude gradients; so does a swap."""
    run, reference = runs[0]["dora"][engine], worker.single_dora()
    assert [n.removeprefix("module.") for n in run["trainable"]] == reference["trainable"]
    assert {n.rsplit(".", 1)[-1] for n in reference["trainable"]} == {"down", "up", "magnitude"}
    torch.testing.assert_close(run["losses"], reference["losses"], rtol=1e-5, atol=1e-7)
    for step, expected in zip(run["grads"], reference["grads"], strict=True):
        assert step.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(step[name], grad, rtol=1e-5, atol=1e-7)
    if engine == "ddp":
        return
    assert run["error"] is None
    torch.testing.assert_close(run["output"], reference["output"], rtol=1e-5, atol=1e-6)
    for part in ("merged", "weights", "magnitude_grads", "swapped", "unswapped"):
        for i, value in reference[part].items():
            torch.testing.assert_close(run[part][i], value, rtol=1e-5, atol=1e-6)
    for i, base in reference["bases"].items():
        torch.testing.assert_close(run["unmerged"][i], base, rtol=1e-5, atol=1e-6)


def test_a_dora_adapter_on_a_base_layer_sharded_itself_is_refused(runs):
    """`fully_shard` applied to a DoRA adapter's base layer itself: outside the base's own
    forward its weight and bias are shards, and the adapter's norm and `out − b` failed
    inside torch ("aten.sub.Tensor got mixed torch.Tensor and DTensor"). A TargetError
    naming the cause now."""
    refused = runs[0]["dora_base"]
    assert isinstance(refused, tuple), f"ran, giving {refused}"
    kind, message = refused
    assert kind == "TargetError" and "DoRA" in message and "fully_shard" in message
