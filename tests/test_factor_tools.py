"""`extract_adapter`, `resize_adapter`, `combine_adapters` on files: results against float64
dense references (`torch.linalg.svd` of tuned − base, einsum sums of the factors), LyCORIS'
`extract_linear` / `extract_conv` and PEFT's `add_weighted_adapter`; and bad input, which
raises a typed error, leaves every input as it was and writes nothing."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from io_helpers import (
    digest,
    listing,
    lora_delta64,
    rel,
    save_sharded,
    save_state,
    targets,
    tiny,
    tucker_delta64,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_factor_space import NO_FACTOR_SPACE
from torch import nn

from lowrank import errors
from lowrank.forms import CP, LoHa, LoKr, LoRA, Tucker2
from lowrank.io import (
    Adapter,
    combine_adapters,
    convert_adapter,
    extract_adapter,
    load_adapter,
    merge_checkpoint,
    resize_adapter,
    save_adapter,
)
from lowrank.io.module_types import peft_conv_mismatch
from lowrank.nn import inject


@pytest.fixture(autouse=True)
def one_thread():
    """LAPACK on one thread: on a busy machine two threads made small SVDs 100× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def delta64(form) -> torch.Tensor:
    if isinstance(form, Tucker2):
        return tucker_delta64(form.down, form.mid, form.up, form.scale)
    return lora_delta64(form.down, form.up, form.scale)


def truncation(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """Eckart–Young: the rank-`rank` truncation of `delta (out, in·K)` and its relative error."""
    flat = delta.double().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    best = ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)
    return best, math.sqrt(float((s[rank:] ** 2).sum() / (s**2).sum()))


class Unchanged:
    """After the block: the inputs are byte-identical and no file appeared in `folder`."""

    def __init__(self, folder, inputs) -> None:
        self.folder, self.inputs = folder, inputs

    def __enter__(self) -> None:
        self.before = (listing(self.folder), digest(self.inputs))

    def __exit__(self, *exc: object) -> None:
        assert listing(self.folder) == self.before[0], "an output or temporary file was left"
        assert digest(self.inputs) == self.before[1], "an input changed"


# --- extract -----------------------------------------------------------------------------


@pytest.fixture
def tune(tmp_path):
    """A float64 base and a fine-tune (one file and sharded): every target but `head` moved
    by a rank-2 update plus noise, and one norm bias changed."""
    model = tiny().double()
    base = model.state_dict()
    g = torch.Generator().manual_seed(1)
    tuned = {k: v.clone() for k, v in base.items()}
    for name, module in targets(model).items():
        if name == "head":
            continue
        shape = module.weight.shape
        left = torch.randn(shape[0], 2, generator=g, dtype=torch.float64)
        right = torch.randn(2, math.prod(shape[1:]), generator=g, dtype=torch.float64)
        noise = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
        tuned[f"{name}.weight"] += (left @ right).reshape(shape) + noise
    tuned["down_blocks.0.norm.bias"] += 1.0
    return {
        "base": save_state(base, tmp_path / "base.safetensors"),
        "tuned": save_state(tuned, tmp_path / "tuned.safetensors"),
        "sharded": save_sharded(tuned, tmp_path / "sharded", 2),
        "deltas": {k[: -len(".weight")]: tuned[k] - base[k] for k in base if k.endswith("weight")},
        "dir": tmp_path,
    }


def extracted(report) -> dict:
    return {row["name"]: row for row in report["layers"]}


def test_extract_at_full_rank_is_exact(tune, tmp_path):
    report = extract_adapter(tune["base"], tune["tuned"], tmp_path / "full", rank=1000)
    rows = extracted(report)
    assert report["skipped"] == ["head"]
    assert report["other_changes"] == ["down_blocks.0.norm.bias"]
    adapter = load_adapter(tmp_path / "full")
    assert adapter.format == "peft" and set(adapter.layers) == set(rows)
    for name, form in adapter.items():
        assert form.down.dtype == torch.float64
        assert rel(delta64(form), tune["deltas"][name]) < 1e-12
        assert rows[name]["relative_error"] < 1e-12
        assert rows[name]["energy"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_extract_at_rank_r_meets_eckart_young(tune, tmp_path, rank):
    out = tmp_path / "lora.safetensors"
    rows = extracted(extract_adapter(tune["base"], tune["tuned"], out, rank, format="kohya"))
    adapter = load_adapter(out)
    for name, form in adapter.items():
        delta = tune["deltas"][name.removeprefix("unet.")]
        best, error = truncation(delta, rank)
        assert form.rank == min(rank, delta.shape[0], delta[0].numel())
        assert rel(delta64(form), best) < 1e-9
        row = rows[name.removeprefix("unet.")]
        assert row["relative_error"] == pytest.approx(error, abs=1e-9)
        assert row["energy"] == pytest.approx(1 - error**2, abs=1e-9)


def test_sharded_checkpoints_extract_the_same(tune, tmp_path):
    sharded_base = save_sharded(load_file(str(tune["base"])), tmp_path / "base_shards", 3)
    extract_adapter(tune["base"], tune["tuned"], tmp_path / "a.safetensors", 2, format="kohya")
    extract_adapter(sharded_base, tune["sharded"].parent, tmp_path / "b.safetensors", 2,
                    format="kohya")  # fmt: skip
    first, second = (
        load_file(str(tmp_path / "a.safetensors")),
        load_file(str(tmp_path / "b.safetensors")),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("rule", [{"energy": 0.9}, {"ratio": 0.3}])
def test_extract_by_energy_or_ratio_picks_each_layers_rank(tune, tmp_path, rule):
    rows = extracted(extract_adapter(tune["base"], tune["tuned"], tmp_path / "e", **rule))
    for name, row in rows.items():
        delta = tune["deltas"][name]
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        if "energy" in rule:
            expected = int((torch.cumsum(s**2, 0) / (s**2).sum() < rule["energy"]).sum()) + 1
        else:
            expected = int((s >= rule["ratio"] * s[0]).sum())
        assert row["rank"] == expected, name


def test_extract_tucker2_on_convolutions(tune, tmp_path):
    out = tmp_path / "t.safetensors"
    report = extract_adapter(
        tune["base"], tune["tuned"], out, rank=2, form="tucker2", conv_rank=3, format="lycoris"
    )
    rows = extracted(report)
    adapter = load_adapter(out)
    for name, form in adapter.items():
        plain = name.removeprefix("unet.")
        k_by_k = plain.endswith("conv_in")
        assert isinstance(form, Tucker2) == k_by_k
        assert rows[plain]["rank"] == ([3, 3] if k_by_k else 2)
        assert rel(delta64(form), tune["deltas"][plain]) == pytest.approx(
            rows[plain]["relative_error"], abs=1e-9
        )
    full = tmp_path / "full.safetensors"
    extract_adapter(tune["base"], tune["tuned"], full, 2, form="tucker2", conv_rank=100,
                    format="kohya")  # fmt: skip
    conv = load_adapter(full)["unet.down_blocks.1.conv_in"]
    assert rel(delta64(conv), tune["deltas"]["down_blocks.1.conv_in"]) < 1e-10


@pytest.mark.parametrize("fmt", ["peft", "diffusers"])
def test_extract_tucker2_into_a_format_without_tucker_gives_the_optimal_locon(fmt, tmp_path):
    """PEFT and diffusers files hold no Tucker2: a HOOI Tucker folded into LoCon was written
    there, worse than the Eckart–Young LoCon of the same size (0.82 against 0.75 on a noisy
    3×3 layer). Each layer's error against the float64 SVD of tuned − base."""
    model = tiny().double()
    base = model.state_dict()
    g = torch.Generator().manual_seed(4)
    moved = {f"{name}.weight" for name in targets(model)}
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) if k in moved else v
             for k, v in base.items()}  # fmt: skip
    paths = (save_state(base, tmp_path / "b.safetensors"),
             save_state(tuned, tmp_path / "t.safetensors"))  # fmt: skip
    report = extract_adapter(*paths, tmp_path / "out", rank=2, form="tucker2", format=fmt)
    assert report["form"] == "lora"
    rows = extracted(report)
    conv = "down_blocks.1.conv_in"
    assert conv in rows
    for name, row in rows.items():
        delta = tuned[f"{name}.weight"] - base[f"{name}.weight"]
        _, best = truncation(delta, 2)
        assert row["relative_error"] == pytest.approx(best, rel=1e-6, abs=1e-9), name


def test_extract_matches_lycoris(tmp_path):
    """LyCORIS' `extract_linear` / `extract_conv` (an exact SVD) on the same differences: a
    rank-1 change over small noise, so the rank-1 truncation is well separated."""
    utils = pytest.importorskip("lycoris.utils")
    model = tiny()
    base = model.state_dict()
    g = torch.Generator().manual_seed(2)
    tuned = dict(base)
    for name in targets(model):
        weight = base[f"{name}.weight"]
        left = torch.randn(weight.shape[0], 1, generator=g)
        right = torch.randn(1, weight[0].numel(), generator=g)
        noise = 0.01 * torch.randn(weight.shape, generator=g)
        tuned[f"{name}.weight"] = weight + (left @ right).reshape(weight.shape) + noise
    base_path = save_state(base, tmp_path / "b.safetensors")
    tuned_path = save_state(tuned, tmp_path / "t.safetensors")
    extract_adapter(base_path, tuned_path, tmp_path / "ours", 1)
    ours = load_adapter(tmp_path / "ours")
    for name, form in ours.items():
        delta = tuned[f"{name}.weight"] - base[f"{name}.weight"]
        extract = utils.extract_conv if delta.ndim == 4 else utils.extract_linear
        (down, up, _), mode = extract(delta, "fixed", 1)
        assert mode == "low rank"
        theirs = (up.flatten(1) @ down.flatten(1)).reshape(delta.shape)
        assert rel(form.to_dense(), theirs) < 1e-5, name


def test_extract_reports_the_energy_its_error_leaves(tune, tmp_path):
    """Full-rank factors stored in bfloat16: the error is their rounding, measured against
    the float64 Δ, and the energy kept is 1 − error², as resize and combine report it (not
    ‖ΔW'‖² / ‖Δ‖², which rounding can push past 1)."""
    out = tmp_path / "b.safetensors"
    rows = extracted(extract_adapter(tune["base"], tune["tuned"], out, rank=1000,
                                     format="kohya", dtype="bfloat16"))  # fmt: skip
    for name, form in load_adapter(out).items():
        row = rows[name.removeprefix("unet.")]
        error = rel(delta64(form), tune["deltas"][name.removeprefix("unet.")])
        assert 1e-4 < row["relative_error"] == pytest.approx(error, rel=1e-6)
        assert row["energy"] == pytest.approx(1 - error**2, abs=1e-12) and row["energy"] < 1


def test_extract_options(tune, tmp_path):
    out = tmp_path / "h.safetensors"
    report = extract_adapter(tune["base"], tune["tuned"], out, 2, format="kohya",
                             dtype="float16", targets=["to_q", "conv_in"])  # fmt: skip
    assert sorted(extracted(report)) == [
        "down_blocks.0.attn.to_q", "down_blocks.0.conv_in",
        "down_blocks.1.attn.to_q", "down_blocks.1.conv_in",
    ]  # fmt: skip
    assert "down_blocks.0.attn.to_out.weight" in report["other_changes"]
    assert {t.dtype for t in load_file(str(out)).values() if t.ndim} == {torch.float16}


def _edit(path, change):
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("out is base", errors.OutputPathError, "is the input"),
        ("other shape", errors.ShapeError, "head.weight has shape"),
        ("missing key", errors.TargetError, "lacks"),
        ("nan", errors.NonFiniteError, "down_blocks.1.proj_out.weight"),
        ("same", errors.TargetError, "nothing to extract"),
        ("corrupt", errors.FileFormatError, "not a valid safetensors file"),
        ("form", errors.ArgumentError, "form must be"),
        ("format", errors.ConversionError, "unknown format"),
        ("device", errors.DeviceError, "device"),
        ("no rank", errors.RankError, "exactly one of rank, energy or ratio to"),
        ("two rules", errors.RankError, "exactly one of rank, energy or ratio to"),
        ("conv_rank", errors.RankError, "conv_rank must be at least 1"),
        ("targets", errors.TargetError, "match no weight"),
    ],
)
def test_extract_bad_input(tune, tmp_path, case, error, match):
    base, tuned, out = tune["base"], tmp_path / "t.safetensors", tmp_path / "out"
    tuned.write_bytes(tune["tuned"].read_bytes())
    kwargs: dict = {"rank": 2}
    if case == "out is base":
        out = base
    elif case == "other shape":
        _edit(tuned, lambda s: s.update({"head.weight": torch.zeros(3, 5, dtype=torch.float64)}))
    elif case == "missing key":
        _edit(tuned, lambda s: s.pop("head.weight"))
    elif case == "nan":
        _edit(tuned, lambda s: s["down_blocks.1.proj_out.weight"].view(-1)[3].fill_(math.nan))
    elif case == "same":
        tuned.write_bytes(base.read_bytes())
    elif case == "corrupt":
        tuned.write_bytes(tuned.read_bytes()[:-5])
    elif case in ("form", "format", "device"):
        kwargs[case] = {"form": "cp", "format": "onnx", "device": "tpu"}[case]
    elif case == "no rank":
        kwargs = {}
    elif case == "two rules":
        kwargs["energy"] = 0.9
    elif case == "conv_rank":
        kwargs["conv_rank"] = 0
    else:
        kwargs["targets"] = ["nothing"]
    with Unchanged(tmp_path, [base, tuned]), pytest.raises(error, match=match):
        extract_adapter(base, tuned, out, **kwargs)


@pytest.mark.parametrize("out", ["tuned", "tuned/a.safetensors", "base/ad.safetensors"])
def test_extract_refuses_to_write_into_a_checkpoint_folder_it_reads(tmp_path, out):
    """A checkpoint given as a folder opens only while it holds one .safetensors file (or an
    index): an adapter written beside it would break the next run, so it is refused."""
    torch.manual_seed(0)
    base = {"l.weight": torch.randn(16, 8)}
    tuned = {"l.weight": base["l.weight"] + 0.1 * torch.randn(16, 8)}
    for name, state in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_state(state, tmp_path / name / "model.safetensors")
    folder = tmp_path / out.partition("/")[0]
    inputs = [tmp_path / "base" / "model.safetensors", tmp_path / "tuned" / "model.safetensors"]
    with Unchanged(folder, inputs), pytest.raises(
        errors.OutputPathError, match=rf"{tmp_path / out}.*{folder}"
    ):
        extract_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / out, 2,
                        format="peft" if out == "tuned" else "kohya")  # fmt: skip
    extract_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / "tuned" / "sub", 2)
    extract_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / "x", 2)  # still opens
    files = [tmp_path / "base" / "model.safetensors", tmp_path / "tuned" / "model.safetensors"]
    with Unchanged(tmp_path / "tuned", inputs), pytest.raises(
        errors.OutputPathError, match=rf"{tmp_path / 'tuned'}.*folder of a checkpoint"
    ):  # the file alone in its folder: a PEFT folder written there breaks that folder too
        extract_adapter(*files, tmp_path / "tuned", 2)
    extract_adapter(*files, tmp_path / "tuned" / "beside.safetensors", 2, format="kohya")


@pytest.mark.parametrize("out", ["base/merged.safetensors", "base"])
def test_merge_refuses_to_write_into_the_checkpoint_folder_it_reads(tmp_path, out):
    """The same rule for a merged checkpoint: one written beside the base would stop the
    base folder opening as one checkpoint."""
    (tmp_path / "base").mkdir()
    state = {"l.weight": torch.randn(8, 6, generator=torch.Generator().manual_seed(0))}
    weights = save_state(state, tmp_path / "base" / "model.safetensors")
    adapter = tmp_path / "a.safetensors"
    save_adapter(Adapter({"l": LoRA(torch.ones(1, 6), torch.ones(8, 1))}), adapter, "kohya")
    with Unchanged(tmp_path / "base", [weights, adapter]), pytest.raises(
        errors.OutputPathError,
        match=r"would write the merged checkpoint into .*base|is the folder of the checkpoint",
    ):
        merge_checkpoint(tmp_path / "base", [adapter], tmp_path / out)
    merge_checkpoint(tmp_path / "base", [adapter], tmp_path / "merged.safetensors")


def test_a_table_the_config_makes_an_embedding_is_left_out_whatever_its_name(tmp_path):
    """DeBERTa's relative-position table `encoder.rel_embeddings` is an `nn.Embedding` that no
    name rule knows: the model that `config.json` describes (built on the meta device) says
    so: extraction leaves it out unless `targets` names it, and a PEFT folder then holds it
    as PEFT's LoRA of an nn.Embedding (`lora_embedding_A` / `_B`)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DebertaV2Config(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, relative_attention=True,
        position_buckets=8, pos_att_type=["p2c", "c2p"],
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.DebertaV2Model(config).state_dict()
    key = "encoder.rel_embeddings.weight"
    g = torch.Generator().manual_seed(1)
    rows, cols = base[key].shape
    change = torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
    tuned = {**base, key: base[key] + change}
    paths = []
    for name, state in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        paths.append(save_state(state, tmp_path / name / "model.safetensors"))
        config.architectures = ["DebertaV2Model"]
        config.to_json_file(tmp_path / name / "config.json")
    with pytest.raises(errors.TargetError, match=r"embedding tables \['encoder.rel_embeddings"):
        extract_adapter(*paths, tmp_path / "peft", rank=2)
    extract_adapter(*paths, tmp_path / "peft", rank=2, targets=["rel_embeddings"])
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(keys) == [f"base_model.model.encoder.rel_embeddings.lora_embedding_{p}"
                            for p in "AB"]  # fmt: skip
    out = tmp_path / "k.safetensors"
    report = extract_adapter(*paths, out, 2, format="kohya", targets=["rel_embeddings"])
    assert list(extracted(report)) == ["encoder.rel_embeddings"]
    for name in ("base", "tuned"):
        (tmp_path / name / "config.json").unlink()  # by name alone it is a plain weight
    report = extract_adapter(*paths, tmp_path / "named", rank=2)
    assert list(extracted(report)) == ["encoder.rel_embeddings"]


def test_grouped_convolutions_are_refused_for_peft_where_the_model_is_known(tmp_path):
    """PEFT gives a grouped convolution a lora_A over all input channels and a grouped lora_B:
    the factors of its `(out, in/groups, k, k)` weight would not load. Where the module types
    are known (a ConvNeXt's `config.json`, a model as base) the layer is refused for PEFT and
    diffusers, and written to kohya files, which lowrank merges exactly."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8], depths=[1],
                                         num_stages=1, architectures=["ConvNextModel"])  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ConvNextModel(config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    key = "encoder.stages.0.layers.0.dwconv.weight"  # (8, 1, 7, 7), groups 8
    tuned = {**base, key: base[key] + 0.1 * torch.randn(base[key].shape)}
    paths = []
    for name, state in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        paths.append(save_state(state, tmp_path / name / "model.safetensors"))
        config.to_json_file(tmp_path / name / "config.json")
    for fmt in ("peft", "diffusers"):
        with pytest.raises(errors.ConversionError, match=r"'encoder.*dwconv'.*grouped"):
            extract_adapter(*paths, tmp_path / fmt, rank=4, format=fmt, targets="dwconv")
        with pytest.raises(errors.TargetError, match=rf"convolutions \['{key}'\]"):
            extract_adapter(*paths, tmp_path / fmt, rank=4, format=fmt)  # left out: nothing
    tuned[key.replace("dwconv", "pwconv1")] = 2 * base[key.replace("dwconv", "pwconv1")]
    save_state(tuned, paths[1])
    report = extract_adapter(*paths, tmp_path / "peft", rank=4)
    assert list(extracted(report)) == ["encoder.stages.0.layers.0.pwconv1"]
    assert report["convolutions"] == [key] and key not in report["other_changes"]
    kohya = tmp_path / "k.safetensors"
    extract_adapter(*paths, kohya, rank=49, format="kohya")
    merge_checkpoint(paths[0], [kohya], tmp_path / "merged.safetensors")
    assert rel(load_file(str(tmp_path / "merged.safetensors"))[key], tuned[key]) < 1e-5
    with pytest.raises(errors.ConversionError, match="grouped"):
        convert_adapter(kohya, tmp_path / "converted", "peft", base=model)
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize(
    ("geometry", "why"),
    [
        (dict(padding=2, dilation=2), "dilated"),
        (dict(padding=1, padding_mode="reflect"), "reflect"),
    ],
)
def test_convolutions_peft_runs_otherwise_than_merged_are_refused_for_peft(tmp_path, geometry, why):
    """PEFT's conv LoRA runs `lora_A` with the base's kernel, stride and padding only: on a
    dilated convolution its adapted layer fails, on a reflect-padded one its output is not
    that of the merged weight (checked with the real PEFT below). Such layers are refused for
    PEFT and diffusers where the model is given, and kept in kohya files."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, **geometry), nn.Conv2d(4, 4, 3, padding=1))
    wrapped = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    )
    x = torch.randn(1, 3, 8, 8)
    try:
        unmerged = wrapped(x)
    except RuntimeError:
        unmerged = None  # the dilated layer's branch has another size
    wrapped.merge_adapter()
    assert unmerged is None or rel(unmerged, wrapped(x)) > 1e-2
    layers = {"0": LoRA(torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1)),
              "1": LoRA(torch.randn(2, 4, 3, 3), torch.randn(4, 2, 1, 1))}  # fmt: skip
    kohya = save_adapter(Adapter(layers), tmp_path / "k.safetensors", "kohya")[0]
    # the model as lowrank.nn adapts it (inject takes both layers) is the same base: its
    # adapters' layers decide (they were passed over as no convolutions)
    injected = copy.deepcopy(model)
    inject(injected, ["0", "1"], rank=2)
    for fmt in ("peft", "diffusers"):
        for given in (model, injected):
            with pytest.raises(errors.ConversionError, match=rf"'0'.*{why}"):
                convert_adapter(kohya, tmp_path / fmt, fmt, base=given)
            assert not (tmp_path / fmt).exists()
    report = convert_adapter(kohya, tmp_path / "k2.safetensors", "kohya", base=model)
    assert report["layers"] == 2
    # a PEFT file's padded layer ran as PEFT runs it (PEFT trained it so): it stays PEFT; a
    # dilated one PEFT cannot run
    peft_dir = save_adapter(Adapter(layers), tmp_path / "from_peft", "peft")[0].parent
    if why == "dilated":
        with pytest.raises(errors.ConversionError, match="dilated"):
            convert_adapter(peft_dir, tmp_path / "peft_again", "peft", base=model)
    else:
        convert_adapter(peft_dir, tmp_path / "peft_again", "peft", base=model)
    one_by_one = nn.Conv2d(3, 4, 1, padding="same", padding_mode="reflect")  # pads nothing
    assert peft_conv_mismatch(one_by_one) is None


class Embedded(nn.Module):
    """A token table (`nn.Embedding`, named as in LLaMA or OPT) and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 16, bias=False)


@pytest.fixture
def embedded(tmp_path):
    """A base and a fine-tune of `Embedded` with rank-2 changes to both weights."""
    torch.manual_seed(0)
    base = Embedded().state_dict()
    g = torch.Generator().manual_seed(1)
    tuned = {
        "embed_tokens.weight": base["embed_tokens.weight"]
        + torch.randn(50, 2, generator=g) @ torch.randn(2, 16, generator=g),
        "lin.weight": base["lin.weight"]
        + torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g),
    }
    return {
        "base": save_state(base, tmp_path / "base.safetensors"),
        "tuned": save_state(tuned, tmp_path / "tuned.safetensors"),
        "states": (base, tuned),
    }


def test_extract_leaves_out_embedding_tables_and_says_so(embedded, tmp_path):
    """PEFT reads an nn.Embedding's LoRA from lora_embedding_A / _B, not lora_A / lora_B: a
    table extracted like a linear weight would load in PEFT with no effect. Extraction
    leaves it out and lists it; PEFT then merges exactly what the report claims."""
    peft = pytest.importorskip("peft")
    out = tmp_path / "ad"
    report = extract_adapter(embedded["base"], embedded["tuned"], out, rank=2)
    assert [row["name"] for row in report["layers"]] == ["lin"]
    assert report["embeddings"] == ["embed_tokens.weight"] and report["other_changes"] == []
    base, tuned = embedded["states"]
    model = Embedded()
    model.load_state_dict(base)
    merged = peft.PeftModel.from_pretrained(model, str(out)).merge_and_unload().state_dict()
    assert rel(merged["lin.weight"], tuned["lin.weight"]) < 1e-6
    assert torch.equal(merged["embed_tokens.weight"], base["embed_tokens.weight"])


def test_named_embedding_tables_are_extracted_for_peft_and_kohya_and_refused_for_diffusers(
    embedded, tmp_path
):
    """`targets` naming a table extracts it: into a PEFT folder as PEFT's LoRA of an
    nn.Embedding (`lora_embedding_A` / `_B`), which PEFT merges to the fine-tune, and into a
    kohya file (which lowrank merges); not into a diffusers file, whose lora_A / lora_B keys
    PEFT would load on the table with no effect."""
    peft = pytest.importorskip("peft")
    chosen = ["embed_tokens", "lin"]
    with Unchanged(tmp_path, [embedded["base"], embedded["tuned"]]), pytest.raises(
        errors.ConversionError, match=r"'embed_tokens'.*lora_embedding_A"
    ):
        extract_adapter(embedded["base"], embedded["tuned"], tmp_path / "x", 2,
                        format="diffusers", targets=chosen)  # fmt: skip
    base, tuned = embedded["states"]
    report = extract_adapter(embedded["base"], embedded["tuned"], tmp_path / "p", 2,
                             format="peft", targets=chosen)  # fmt: skip
    assert sorted(extracted(report)) == chosen and report["embeddings"] == []
    keys = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert {"base_model.model.embed_tokens.lora_embedding_A",
            "base_model.model.embed_tokens.lora_embedding_B"} < set(keys)  # fmt: skip
    model = Embedded()
    model.load_state_dict(base)
    merged = peft.PeftModel.from_pretrained(model, str(tmp_path / "p")).merge_and_unload()
    for key in ("embed_tokens.weight", "lin.weight"):
        assert rel(merged.state_dict()[key], tuned[key]) < 1e-6, key
    out = tmp_path / "k.safetensors"
    report = extract_adapter(embedded["base"], embedded["tuned"], out, 2, format="kohya",
                             targets=chosen)  # fmt: skip
    assert sorted(extracted(report)) == chosen and report["embeddings"] == []
    merge_checkpoint(embedded["base"], [out], tmp_path / "merged.safetensors")
    merged, tuned = load_file(str(tmp_path / "merged.safetensors")), embedded["states"][1]
    assert rel(merged["embed_tokens.weight"], tuned["embed_tokens.weight"]) < 1e-6


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there")
def test_extract_on_cuda_without_cuda_is_a_device_error(tune, tmp_path):
    with pytest.raises(errors.DeviceError, match="no CUDA device"):
        extract_adapter(tune["base"], tune["tuned"], tmp_path / "x", 2, device="cuda")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extract_on_cuda_matches_cpu(tune, tmp_path):
    extract_adapter(tune["base"], tune["tuned"], tmp_path / "c.safetensors", 2, format="kohya")
    extract_adapter(tune["base"], tune["tuned"], tmp_path / "g.safetensors", 2, format="kohya",
                    device="cuda")  # fmt: skip
    cpu, gpu = load_adapter(tmp_path / "c.safetensors"), load_adapter(tmp_path / "g.safetensors")
    for name, form in cpu.items():
        assert rel(gpu[name].to_dense(), form.to_dense()) < 1e-9


# --- resize ------------------------------------------------------------------------------


@pytest.fixture
def kohya(tmp_path):
    """A float64 kohya file: rank-4 LoRA / LoCon layers (scale 0.5) and a Tucker conv_in."""
    model = tiny()
    g = torch.Generator().manual_seed(3)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    layers = {}
    for name, module in targets(model).items():
        out_f, in_f, *kernel = module.weight.shape
        ones = (1,) * len(kernel)
        if name.endswith("conv_in"):
            layers[name] = Tucker2(t(4, in_f, *ones), t(4, 4, *kernel), t(out_f, 4, *ones), 0.5)
        else:
            layers[name] = LoRA(t(4, in_f, *kernel), t(out_f, 4, *ones), 0.5)
    path = tmp_path / "lora.safetensors"
    save_adapter(Adapter(layers, "kohya", metadata={"ss_network_dim": "4"}), path, "kohya")
    adapter = load_adapter(path)
    return {"path": path, "layers": dict(adapter.items()), "model": model}


def test_resize_adapter_is_the_optimal_truncation(kohya, tmp_path):
    out = tmp_path / "small.safetensors"
    report = resize_adapter(kohya["path"], out, rank=2)
    rows = extracted(report)
    resized = load_adapter(out)
    assert resized.format == "kohya" and report["format"] == "kohya"
    for name, form in resized.items():
        before = kohya["layers"][name]
        assert form.scale == before.scale
        delta = delta64(before)
        assert rows[name]["rank_before"] == ([4, 4] if isinstance(before, Tucker2) else 4)
        if isinstance(before, Tucker2):
            assert isinstance(form, Tucker2) and form.rank == (2, 2)
            assert rel(delta64(form), delta) == pytest.approx(rows[name]["relative_error"])
            continue
        best, error = truncation(delta, 2)
        assert form.rank == 2 and rel(delta64(form), best) < 1e-9
        assert rows[name]["relative_error"] == pytest.approx(error, abs=1e-12)
    assert resized.metadata["ss_network_dim"] == "2"  # the linear layers' rank


def test_resize_to_peft_folds_tucker_layers_first(kohya, tmp_path):
    resize_adapter(kohya["path"], tmp_path / "p", rank=2, format="peft")
    resized = load_adapter(tmp_path / "p")
    for name, form in resized.items():
        best, _ = truncation(delta64(kohya["layers"][f"unet.{name}"]), 2)
        assert rel(delta64(form), best) < 1e-9, name


def test_resize_at_or_above_the_rank_copies_the_tensors(kohya, tmp_path):
    out = tmp_path / "same.safetensors"
    report = resize_adapter(kohya["path"], out, rank=4)
    assert {row["relative_error"] for row in report["layers"]} == {0.0}
    before, after = load_file(str(kohya["path"])), load_file(str(out))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resize_energy_keeps_the_share(kohya, tmp_path):
    rows = extracted(resize_adapter(kohya["path"], tmp_path / "e.safetensors", energy=0.95))
    for name, row in rows.items():
        if not isinstance(kohya["layers"][name], Tucker2):
            assert row["energy"] >= 0.95


class Convs(nn.Module):
    """Two 3×3 convolutions, one with fewer output channels (3) than the ranks used here."""

    def __init__(self) -> None:
        super().__init__()
        self.tk = nn.Conv2d(6, 10, 3, padding=1)
        self.narrow = nn.Conv2d(12, 3, 3, padding=1)


def lycoris_deltas(lycoris, path) -> dict[str, torch.Tensor]:
    """ΔW of each `Convs` layer as LyCORIS loads the file at `path` and merges it."""
    model = Convs()
    before = {name: module.weight.detach().clone() for name, module in model.named_children()}
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    assert len(network.loras) == len(before)
    network.merge_to()
    return {name: model.get_submodule(name).weight.detach() - w for name, w in before.items()}


def kohya_tucker(path, layers: dict[str, tuple[torch.Tensor, ...]]) -> None:
    """A kohya file of Tucker layers `{stem: (down, mid, up, alpha)}` written key by key."""
    tensors = {}
    for stem, (down, mid, up, alpha) in layers.items():
        parts = {"lora_down": down, "lora_mid": mid, "lora_up": up}
        tensors.update({f"{stem}.{part}.weight": t for part, t in parts.items()})
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


@pytest.mark.parametrize("fmt", ["kohya", "lycoris"])
@pytest.mark.parametrize("rule", [{"rank": 5}, {"energy": 0.9}, {"ratio": 0.3}], ids=str)
def test_resized_tucker_layers_load_in_lycoris(tmp_path, lycoris, fmt, rule):
    """kohya and LyCORIS read a Tucker layer's rank from lora_down and need lora_mid (r, r,
    k, k): every rule gives equal inner ranks, and LyCORIS merges the file to our ΔW."""
    g = torch.Generator().manual_seed(1)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    source = tmp_path / "in.safetensors"
    kohya_tucker(source, {
        "lycoris_tk": (t(8, 6, 1, 1), t(8, 8, 3, 3), t(10, 8, 1, 1), 4.0),
        "lycoris_narrow": (t(6, 12, 1, 1), t(6, 6, 3, 3), t(3, 6, 1, 1), 3.0),
    })  # fmt: skip
    lycoris_deltas(lycoris, source)  # LyCORIS loads the input
    out = tmp_path / "out.safetensors"
    rows = extracted(resize_adapter(source, out, format=fmt, **rule))
    theirs = lycoris_deltas(lycoris, out)
    before, after = load_adapter(source), load_adapter(out)
    for name in ("tk", "narrow"):
        form = after[f"lycoris_{name}"]
        r_out, r_in = form.rank
        assert r_out == r_in and rows[f"lycoris_{name}"]["rank"] == [r_in, r_in]
        assert rel(theirs[name], delta64(form)) < 1e-5
        if "energy" in rule:
            kept = delta64(form).norm() ** 2 / delta64(before[f"lycoris_{name}"]).norm() ** 2
            assert kept >= 0.9


@pytest.mark.parametrize("rule", [{"energy": 0.8}, {"rank": 2, "conv_rank": 8}], ids=str)
def test_extracted_tucker_layers_load_in_lycoris(tmp_path, lycoris, rule):
    """`--form tucker2` into a LyCORIS file: equal inner ranks (rank 8 on a conv with 6
    inputs or 3 outputs pads that side with zeros, as LyCORIS trains it), ≥ 80 % of ‖Δ‖² for
    energy 0.8, and LyCORIS merges the file to base + our ΔW."""
    torch.manual_seed(0)
    base = Convs().state_dict()
    g = torch.Generator().manual_seed(2)
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = [save_state(state, tmp_path / f"{n}.safetensors")
             for n, state in (("base", base), ("tuned", tuned))]  # fmt: skip
    out = tmp_path / "ex.safetensors"
    extract_adapter(*paths, out, form="tucker2", format="lycoris", prefix="lycoris", **rule)
    theirs = lycoris_deltas(lycoris, out)
    for name, form in load_adapter(out).items():
        module = name.removeprefix("lycoris_")
        delta = tuned[f"{module}.weight"].double() - base[f"{module}.weight"].double()
        assert isinstance(form, Tucker2) and form.rank[0] == form.rank[1]
        assert rel(theirs[module], delta64(form)) < 1e-5
        if "energy" in rule:
            assert delta64(form).norm() ** 2 >= 0.8 * delta.norm() ** 2
        else:
            assert form.rank == (8, 8)  # (8, 6) on tk, (3, 8) on narrow, padded


def kohya_metadata(path) -> dict:
    """The `ss_*` metadata of a safetensors file, `ss_network_args` parsed."""
    with safe_open(str(path), "pt") as handle:
        metadata = {k: v for k, v in (handle.metadata() or {}).items() if k.startswith("ss_")}
    metadata["ss_network_args"] = json.loads(metadata["ss_network_args"])
    return metadata


@pytest.mark.parametrize(
    ("with_linear", "rule", "dims"),
    [
        (True, {"rank": 3}, ("3", "3", "3", "3")),
        (False, {"rank": 3}, ("3", "3", "3", "3")),
        (True, {"energy": 0.9}, ("2", "2", "Dynamic", "Dynamic")),
    ],
)
def test_resize_writes_kohya_metadata_of_the_written_layers(tmp_path, with_linear, rule, dims):
    """`ss_network_dim` / `ss_network_alpha` describe the linear layers (all layers when
    there are none) and `conv_dim` / `conv_alpha` in `ss_network_args` the k×k convolutions,
    as sd-scripts and LyCORIS set them: one rank as an integer, else "Dynamic". sd-scripts'
    hashes of the input's tensors were copied unchanged; they are left out."""
    g = torch.Generator().manual_seed(1)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    # c and lin: 2 large directions over small ones, so energy 0.9 keeps rank 2 (tk: 5)
    strong = torch.tensor([10.0, 10.0, *[0.01] * 6])
    layers = {
        "tk": Tucker2(t(8, 6, 1, 1), t(8, 8, 3, 3), t(10, 8, 1, 1)),
        "c": LoRA(t(8, 6, 3, 3) * strong[:, None, None, None], t(10, 8, 1, 1)),
    }
    if with_linear:
        layers["lin"] = LoRA(t(8, 20) * strong[:, None], t(16, 8))
    args = {"conv_dim": "8", "conv_alpha": "8", "algo": "locon", "use_tucker": "True"}
    metadata = {"ss_network_dim": "8", "ss_network_alpha": "8",
                "ss_network_args": json.dumps(args)}  # fmt: skip
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_adapter(Adapter(layers, "kohya", metadata=metadata), source, "kohya")
    with safe_open(str(source), "pt") as handle:  # as sd-scripts writes them
        hashes = {"sshs_model_hash": "abc", "sshs_legacy_hash": "def",
                  "modelspec.hash_sha256": "0x12"}  # fmt: skip
        stored = {**handle.metadata(), **hashes, "modelspec.title": "kept"}
    save_file(load_file(str(source)), str(source), stored)
    resize_adapter(source, out, **rule)
    with safe_open(str(out), "pt") as handle:
        assert not set(hashes) & set(handle.metadata())
        assert handle.metadata()["modelspec.title"] == "kept"
    written = kohya_metadata(out)
    args = written["ss_network_args"]
    found = (written["ss_network_dim"], written["ss_network_alpha"], args["conv_dim"],
             args["conv_alpha"])  # fmt: skip
    assert found == dims
    assert args["algo"] == "locon"


def test_resize_bad_input(kohya, tmp_path):
    g = torch.Generator().manual_seed(0)
    first, second = (LoRA(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))
                     for _ in range(2))  # fmt: skip
    loha = tmp_path / "loha.safetensors"
    save_adapter(Adapter({"down_blocks.0.attn.to_q": LoHa(first, second)}), loha, "lycoris")
    cases = [
        (loha, tmp_path / "o.safetensors", {"rank": 1}, errors.DTypeError,
         f"loha.safetensors: layer 'unet.down_blocks.0.attn.to_q' is a LoHa, .*{NO_FACTOR_SPACE}"),
        (kohya["path"], kohya["path"], {"rank": 1}, errors.OutputPathError, "is the input"),
        (kohya["path"], tmp_path / "o.safetensors", {"rank": 0}, errors.RankError, "at least 1"),
        (kohya["path"], tmp_path / "o", {"rank": 1, "format": "x"}, errors.ConversionError, "x"),
    ]  # fmt: skip
    for source, out, kwargs, error, match in cases:
        with Unchanged(tmp_path, [kohya["path"], loha]), pytest.raises(error, match=match):
            resize_adapter(source, out, **kwargs)


def test_resize_refuses_ss_network_args_nested_too_deeply_to_update(kohya, tmp_path):
    """Python's JSON parser gives up on it (RecursionError): its conv_dim cannot be set to
    the ranks written. Text that is not JSON at all holds no settings and is kept."""
    source = tmp_path / "deep.safetensors"
    nested = "[" * 100_000 + "]" * 100_000
    save_file(load_file(kohya["path"]), source, metadata={"ss_network_args": nested})
    with Unchanged(tmp_path, [kohya["path"], source]), pytest.raises(
        errors.FileFormatError, match=f"{source}: metadata ss_network_args is JSON nested too"
    ):
        resize_adapter(source, tmp_path / "small.safetensors", rank=2)
    save_file(load_file(kohya["path"]), source, metadata={"ss_network_args": "{conv_dim"})
    resize_adapter(source, tmp_path / "small.safetensors", rank=2)
    with safe_open(str(tmp_path / "small.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_network_args"] == "{conv_dim"


def test_an_unknown_format_is_one_error_everywhere(kohya, tmp_path):
    adapter = load_adapter(kohya["path"])
    calls = [
        lambda: save_adapter(adapter, tmp_path / "s", "onnx"),
        lambda: resize_adapter(kohya["path"], tmp_path / "r", 1, format="onnx"),
        lambda: combine_adapters([kohya["path"]], tmp_path / "c", format="onnx"),
    ]
    for call in calls:
        with Unchanged(tmp_path, [kohya["path"]]), pytest.raises(
            errors.ConversionError, match="unknown format 'onnx'; choose one of peft, kohya"
        ):
            call()


# --- combine -----------------------------------------------------------------------------


@pytest.fixture
def three(tmp_path):
    """Three adapters on the tiny model: kohya rank 1 (float64), PEFT rank 2 and kohya rank 3
    with a Tucker conv_in; `head` only in the second."""
    model = tiny()
    g = torch.Generator().manual_seed(4)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5

    sets = []
    for rank, scale in ((1, 2.0), (2, 0.5), (3, 0.25)):
        layers = {}
        for name, module in targets(model).items():
            out_f, in_f, *kernel = module.weight.shape
            ones = (1,) * len(kernel)
            if name == "head" and rank != 2:
                continue
            if rank == 3 and name.endswith("conv_in"):
                mid = t(rank, 2, *kernel)
                layers[name] = Tucker2(t(2, in_f, *ones), mid, t(out_f, rank, *ones), scale)
            else:
                layers[name] = LoRA(t(rank, in_f, *kernel), t(out_f, rank, *ones), scale)
        sets.append(layers)
    paths = [tmp_path / "a.safetensors", tmp_path / "b", tmp_path / "c.safetensors"]
    for layers, path, fmt in zip(sets, paths, ("kohya", "peft", "kohya"), strict=True):
        save_adapter(Adapter(layers), path, fmt)
    return {"paths": paths, "sets": sets, "model": model}


WEIGHTS = [0.7, -1.2, 0.4]


def weighted_sum(sets, name, weights=WEIGHTS):
    return sum(w * delta64(s[name]) for s, w in zip(sets, weights, strict=True) if name in s)


def test_combine_is_the_exact_weighted_sum(three, tmp_path):
    out = tmp_path / "sum.safetensors"
    report = combine_adapters(three["paths"], out, WEIGHTS, base=three["model"])
    rows = extracted(report)
    combined = load_adapter(out).select("unet")
    assert set(combined.layers) == {n for s in three["sets"] for n in s}
    for name, form in combined.items():
        expected = weighted_sum(three["sets"], name)
        assert rel(delta64(form), expected) < 1e-6, name  # PEFT's folder holds float32
        assert rows[f"unet.{name}"]["relative_error"] == 0.0
    head = combined["head"]  # only in the PEFT adapter: carried over with its weight
    assert head.rank == 2 and head.scale == pytest.approx(-1.2 * 0.5)
    conv = combined["down_blocks.0.conv_in"]
    assert conv.rank == 1 + 2 + 3


@pytest.mark.parametrize("weight", [1e-3, 1e-12])
def test_combine_in_float16_is_exact(tmp_path, weight):
    """Two float16 kohya LoRAs on one layer, equal weights: the combination stores their
    factors as they are (scale weight · alpha / r), so its ΔW is the float64 weighted sum and
    its reported error 0. With unequal weights (ratio 0.3, not a power of two) the rounding of
    the rescaled factors is reported, as measured against float64."""
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(2):
        paths.append(save_state({
            "lora_unet_a.lora_down.weight": torch.randn(4, 64, generator=g).half(),
            "lora_unet_a.lora_up.weight": torch.randn(64, 4, generator=g).half(),
            "lora_unet_a.alpha": torch.tensor(4.0)}, tmp_path / f"a{i}.safetensors"))  # fmt: skip
    dense = [delta64(load_adapter(p)["lora_unet_a"]) for p in paths]
    for weights in ([weight, weight], [weight, 0.3 * weight]):
        out = tmp_path / f"sum-{weights[1]}.safetensors"
        report = combine_adapters(paths, out, weights)
        expected = weights[0] * dense[0] + weights[1] * dense[1]
        form = load_adapter(out)["lora_unet_a"]
        assert form.down.dtype == torch.float16
        error = rel(delta64(form), expected)
        reported = report["layers"][0]["relative_error"]
        if weights[1] == weights[0]:
            assert error < 1e-15 and reported == 0.0
        else:
            assert 1e-5 < error < 1e-3 and reported == pytest.approx(error, rel=1e-6)


def test_combine_truncated_reports_the_optimal_error(three, tmp_path):
    out = tmp_path / "two.safetensors"
    rows = extracted(combine_adapters(three["paths"], out, WEIGHTS, 2, base=three["model"]))
    for name, form in load_adapter(out).select("unet").items():
        best, error = truncation(weighted_sum(three["sets"], name), 2)
        assert rel(delta64(form), best) < 1e-5
        assert rows[f"unet.{name}"]["relative_error"] == pytest.approx(error, abs=1e-6)


@pytest.mark.parametrize("rank", [None, 3])
def test_combine_writes_a_lone_tucker_layer_as_the_optimal_locon_without_a_mid(tmp_path, rank):
    """A Tucker layer in one adapter, written to PEFT (no mid factor): truncated, it is the
    Eckart–Young LoCon of its ΔW (not a HOOI Tucker folded afterwards); either way the report
    names the LoCon the file holds."""
    g = torch.Generator().manual_seed(4)
    tucker = Tucker2(*(torch.randn(*s, generator=g, dtype=torch.float64)
                       for s in ((8, 6, 1, 1), (8, 8, 3, 3), (10, 8, 1, 1))))  # fmt: skip
    lora = LoRA(torch.randn(4, 20, generator=g), torch.randn(16, 4, generator=g))
    out = tmp_path / "c"
    report = combine_adapters([Adapter({"m.conv": tucker}), Adapter({"m.lin": lora})], out,
                              rank=rank, format="peft")  # fmt: skip
    row = extracted(report)["m.conv"]
    form = load_adapter(out)["m.conv"]
    assert row["form"] == "LoCon" and row["rank"] == form.rank == (rank or 8)
    best, error = truncation(delta64(tucker), rank or 8)
    assert rel(delta64(form), best) < 1e-9
    assert row["relative_error"] == pytest.approx(error, abs=1e-9)


def lokr_delta64(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """ΔW of a dense LoKr by its definition, `ΔW[i·b + j, p·d + q] = w1[i, p] · w2[j, q]`."""
    a, c = w1.shape
    b, d = w2.shape
    blocks = w1.double()[:, None, :, None] * w2.double()[None, :, None, :]
    return blocks.reshape(a * b, c * d)


def cp_delta64(form) -> torch.Tensor:
    """ΔW of a CP without weights: `scale Σ_ρ out[:, ρ] ⊗ in[:, ρ] ⊗ k₁[:, ρ] ⊗ k₂[:, ρ]`."""
    factors = (form.out_factor, form.in_factor, *form.spatial_factors)
    return form.scale * torch.einsum("oz,iz,az,bz->oiab", *(f.double() for f in factors))


@pytest.mark.parametrize("fmt", ["peft", "lycoris"])
def test_combine_carries_a_lone_layer_of_any_form_with_its_weight(tmp_path, fmt):
    """A layer in one adapter enters the sum exactly like a shared one: a CP as its LoRA, a
    LoKr with dense w1 and w2 (which files give scale 1) with the weight folded into w2."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    cp = CP(t(10, 3), t(6, 3), (t(3, 3), t(3, 3)), scale=0.5)
    lokr = LoKr(t(2, 4), t(8, 5))
    lora = LoRA(t(4, 20), t(16, 4))
    layers = {"m.cp": cp, "m.lin": lora} if fmt == "peft" else {"m.cp": cp, "m.k": lokr}
    first, second = Adapter(layers), Adapter({"m.lin": lora})
    out = tmp_path / ("c" if fmt == "peft" else "c.safetensors")
    combine_adapters([first, second], out, weights=[-0.5, 2.0], format=fmt)
    combined = load_adapter(out).select()
    assert rel(combined["m.cp"].to_dense(), -0.5 * cp_delta64(cp)) < 1e-6
    if fmt == "lycoris":
        assert rel(combined["m.k"].to_dense(), -0.5 * lokr_delta64(lokr.w1, lokr.w2)) < 1e-6


@pytest.mark.parametrize("fmt", ["kohya", "lycoris", "peft"])
def test_combine_drops_the_layers_a_weight_of_zero_removes(three, tmp_path, fmt):
    """Weight 0 on the only adapter with `head` drops it (listed in the report, ΔW = 0);
    on a shared layer the other adapters' terms remain, at their own rank."""
    first, peft_dir, _ = three["paths"]
    out = tmp_path / ("z" if fmt == "peft" else "z.safetensors")
    report = combine_adapters([first, peft_dir], out, [0.7, 0.0], base=three["model"],
                              format=fmt)  # fmt: skip
    assert report["dropped"] == ["unet.head"]
    back = load_adapter(out)
    combined = back.select("unet") if back.components else back  # PEFT: one model, no prefix
    assert "head" not in combined.layers
    for name, form in combined.items():
        assert form.rank == three["sets"][0][name].rank  # 1, not 1 + 2
        expected = weighted_sum(three["sets"][:2], name, [0.7, 0.0])
        assert rel(delta64(form), expected) < 1e-6, name


def test_combine_matches_peft_cat(three, tmp_path):
    """PEFT's `add_weighted_adapter(combination_type="cat")` on the same three LoRAs."""
    peft = pytest.importorskip("peft")
    sets = [{n: f for n, f in s.items() if isinstance(f, LoRA)} for s in three["sets"]]
    names = sorted(set(sets[0]) & set(sets[1]) & set(sets[2]))
    model = tiny()
    for i, layers in enumerate(sets):
        ranks = {n: f.rank for n, f in layers.items()}
        rank = next(iter(ranks.values()))
        config = peft.LoraConfig(r=rank, lora_alpha=rank * layers[names[0]].scale,
                                 target_modules=names)  # fmt: skip
        if i == 0:
            model = peft.get_peft_model(model, config, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for name in names:
            module = model.base_model.model.get_submodule(name)
            for i, layers in enumerate(sets):
                module.lora_A[f"a{i}"].weight.copy_(layers[name].down)
                module.lora_B[f"a{i}"].weight.copy_(layers[name].up)
    model.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, "cat", combination_type="cat")
    paths = []
    for i, layers in enumerate(sets):
        paths.append(tmp_path / f"only{i}.safetensors")
        save_adapter(Adapter({n: layers[n] for n in names}), paths[-1], "kohya")
    combine_adapters(paths, tmp_path / "ours.safetensors", WEIGHTS)
    ours = load_adapter(tmp_path / "ours.safetensors").select("unet")
    for name in names:
        theirs = model.base_model.model.get_submodule(name).get_delta_weight("cat")
        assert rel(ours[name].to_dense(), theirs) < 1e-6, name
        assert rel(theirs, weighted_sum(sets, name)) < 1e-6


def test_combine_bad_input(three, tmp_path):
    other = tmp_path / "other.safetensors"
    g = torch.Generator().manual_seed(0)
    save_adapter(
        Adapter({"down_blocks.0.attn.to_q": LoRA(torch.randn(2, 5, generator=g),
                                                 torch.randn(8, 2, generator=g))}),
        other, "kohya",
    )  # fmt: skip
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(str(three["paths"][0])), str(stripped))  # kohya names, no record
    first, peft_dir, last = three["paths"]
    cases = [
        ([first, other], tmp_path / "o.safetensors", {}, errors.ShapeError, "(8, 5)"),
        ([first, last], first, {}, errors.OutputPathError, "is the input"),
        ([stripped, peft_dir], tmp_path / "o", {}, errors.TargetError, "kohya's way"),
        ([first, last], tmp_path / "o", {"weights": [1.0]}, errors.ArgumentError, "weights"),
        ([first], tmp_path / "o", {"weights": [math.inf]}, errors.NonFiniteError, "weights"),
        ([], tmp_path / "o", {}, errors.ArgumentError, "at least one"),
        ([first, last], tmp_path / "o", {"weights": [0, 0.0]}, errors.ArgumentError, "weighted 0"),
    ]
    inputs = [*three["paths"], other, stripped]
    for sources, out, kwargs, error, match in cases:
        with Unchanged(tmp_path, inputs), pytest.raises(error, match=match):
            combine_adapters(sources, out, **kwargs)


def test_combine_maps_kohya_names_through_the_base(three, tmp_path):
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(str(three["paths"][0])), str(stripped))
    report = combine_adapters([stripped, three["paths"][1]], tmp_path / "m", [1.0, 1.0],
                              base=three["model"], format="peft")  # fmt: skip
    assert json.dumps(report)  # JSON-ready
    combined = load_adapter(tmp_path / "m")
    expected = weighted_sum(three["sets"][:2], "down_blocks.1.attn.to_out", [1.0, 1.0])
    assert rel(delta64(combined["down_blocks.1.attn.to_out"]), expected) < 1e-6


def only_layer(path):
    (form,) = load_adapter(path).layers.values()
    return form


def dense64(form) -> torch.Tensor:
    return form.to(torch.float64).to_dense()


def _float16_forms():
    g = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).half()

    return {
        "tucker": Tucker2(rnd(4, 6, 1, 1), rnd(4, 4, 3, 3), rnd(5, 4, 1, 1), scale=0.75),
        "lokr": LoKr(rnd(2, 3), rnd(4, 5)),  # w1 and w2 dense: no rank, stored at scale 1
        "lora": LoRA(rnd(8, 6), rnd(5, 8), scale=0.5),
        # Tucker chains off the kernel (1×1, linear), which kohya / LyCORIS files hold folded
        "tucker_1x1": Tucker2(rnd(3, 6, 1, 1), rnd(3, 3, 1, 1), rnd(5, 3, 1, 1), scale=0.75),
        "loha_linear": LoHa(*(Tucker2(rnd(3, 6), rnd(3, 3), rnd(5, 3)) for _ in range(2)), 0.5),
    }


@pytest.mark.parametrize(("layer", "fmt", "kwargs", "dtype"), [
    # folded into a LoCon, kept in float32 where float16 cannot hold the fold
    ("tucker", "peft", {}, torch.float32),
    ("lokr", "lycoris", {}, torch.float16),  # the weight split over w1 and w2
    ("lora", "kohya", {"rank": 7}, torch.float16),  # truncated, then stored in float16
    ("tucker_1x1", "kohya", {}, torch.float32),  # folded: reported as a Tucker2, error 0
    ("loha_linear", "lycoris", {}, torch.float32),  # its halves folded
])  # fmt: skip
def test_every_reported_error_is_the_stored_layers(tmp_path, layer, fmt, kwargs, dtype):
    """A layer from one adapter, weighted: its reported error is that of the factors the file
    holds against the float64 weighted ΔW, rounding included (float16's, or float32's for a
    fold kept in float32), not the truncation's alone."""
    form = _float16_forms()[layer]
    weight = 0.7
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    report = combine_adapters([Adapter({"blk": form})], out, [weight], format=fmt, **kwargs)
    stored = only_layer(out)
    assert {t.dtype for t in stored.named_factors().values()} == {dtype}
    measured = rel(dense64(stored), weight * dense64(form))
    # the rounding: the old reports said 0 or the truncation's
    assert measured > (1e-6 if dtype == torch.float16 else 1e-9)
    assert measured < (1e-2 if dtype == torch.float16 else 1e-6)
    assert report["layers"][0]["relative_error"] == pytest.approx(measured, rel=1e-6)


def test_a_resize_that_folds_reports_the_folds_rounding(tmp_path):
    form = _float16_forms()["tucker"]
    report = resize_adapter(save_adapter_file(tmp_path, form), tmp_path / "out", rank=8,
                            format="peft")  # fmt: skip
    stored = only_layer(tmp_path / "out")
    measured = rel(dense64(stored), dense64(form))
    assert measured > 1e-6
    assert report["layers"][0]["relative_error"] == pytest.approx(measured, rel=1e-6)


def save_adapter_file(tmp_path, form):
    path = tmp_path / "in.safetensors"
    save_adapter(Adapter({"blk": form}), path, "kohya")
    return path


def test_a_dense_lokr_weight_goes_where_both_factors_hold_it(tmp_path):
    """w1 near float16's largest and w2 small: an even split of the weight 4 would overflow
    w1, all of it on w2 does not."""
    form = LoKr(torch.full((2, 2), 4e4).half(), torch.full((2, 2), 1e-3).half())
    report = combine_adapters([Adapter({"blk": form})], tmp_path / "a.safetensors", [4.0],
                              format="lycoris")  # fmt: skip
    stored = only_layer(tmp_path / "a.safetensors")
    measured = rel(dense64(stored), 4 * dense64(form))
    assert measured < 1e-3 and report["layers"][0]["relative_error"] == pytest.approx(measured)


def test_a_dense_lokr_weight_is_split_and_overflow_is_refused_by_layer(tmp_path):
    form = _float16_forms()["lokr"]
    report = combine_adapters([Adapter({"blk": form})], tmp_path / "a.safetensors", [1e5],
                              format="lycoris")  # fmt: skip
    stored = only_layer(tmp_path / "a.safetensors")
    assert rel(dense64(stored), 1e5 * dense64(form)) < 1e-3  # w2 · 1e5 alone would be Inf
    assert report["layers"][0]["relative_error"] < 1e-3
    with pytest.raises(errors.NonFiniteError, match=r"layer 'blk'.*overflows torch\.float16"):
        combine_adapters([Adapter({"blk": form})], tmp_path / "b.safetensors", [1e12],
                         format="lycoris")  # fmt: skip
    assert not (tmp_path / "b.safetensors").exists()
    with pytest.raises(errors.NonFiniteError, match=r"layer 'blk'.*underflows to zero"):
        combine_adapters([Adapter({"blk": form})], tmp_path / "c.safetensors", [1e-20],
                         format="lycoris")  # fmt: skip


def test_writers_refuse_factors_their_readers_would_refuse(tmp_path):
    bad = LoRA(torch.full((2, 4), math.inf), torch.ones(3, 2))
    with pytest.raises(errors.NonFiniteError, match="layer 'blk': down"):
        save_adapter(Adapter({"blk": bad}), tmp_path / "x.safetensors", "kohya")
    huge = LoRA(torch.ones(8, 4), torch.ones(3, 8), scale=1e308)
    with pytest.raises(errors.NonFiniteError, match=r"layer 'blk'.*alpha"):
        save_adapter(Adapter({"blk": huge}), tmp_path / "y.safetensors", "kohya")
    assert list(tmp_path.iterdir()) == []


def _pair(tmp_path, base: dict, tuned: dict, folder: str = "ckpt"):
    """A base and a tuned checkpoint, each in its own folder."""
    paths = []
    for name, state in (("base", base), ("tuned", tuned)):
        (tmp_path / folder / name).mkdir(parents=True)
        paths.append(save_state(state, tmp_path / folder / name / "model.safetensors"))
    return paths


def _two_layers():
    g = torch.Generator().manual_seed(4)
    base = {f"{n}.weight": torch.randn(8, 6, generator=g) for n in ("blk.to_q", "blk.to_v")}
    tuned = {k: v + 0.1 * torch.randn(8, 6, generator=g) for k, v in base.items()}
    return base, tuned


def test_extract_targets_are_patterns_as_everywhere(tmp_path):
    base, tuned = _pair(tmp_path, *_two_layers())
    for patterns in ("to_q", ["to_q"], "re:.*to_q", "blk.to_q,missing"):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.safetensors"
        report = extract_adapter(base, tuned, out, rank=2, format="kohya", targets=patterns)
        assert [row["name"] for row in report["layers"]] == ["blk.to_q"], patterns
    for bad in (["re:["], [3], {"to_q": {"r": 2}}):
        with pytest.raises(errors.TargetError):
            extract_adapter(base, tuned, tmp_path / "bad.safetensors", rank=2, targets=bad)


def test_extract_reports_every_other_difference_by_value(tmp_path):
    base, tuned = _two_layers()
    base["blk.norm.bias"] = torch.zeros(8)  # dropped by the fine-tune
    tuned["blk.head.bias"] = torch.ones(4)  # added by it
    base["blk.to_q.bias"], tuned["blk.to_q.bias"] = torch.ones(8), torch.ones(8).half()
    base["blk.scale"] = torch.full((2,), 0.5).to(torch.float8_e4m3fn)  # the same in float8
    tuned["blk.scale"] = torch.full((2,), 0.5, dtype=torch.bfloat16)
    base["blk.steps"], tuned["blk.steps"] = torch.tensor([2049]), torch.tensor([2048.0]).half()
    paths = _pair(tmp_path, base, tuned)
    report = extract_adapter(*paths, tmp_path / "out.safetensors", rank=2, format="kohya")
    assert sorted(report["other_changes"]) == ["blk.head.bias", "blk.norm.bias", "blk.steps"]


def test_extract_names_a_weight_whose_kind_changed(tmp_path):
    base, tuned = _two_layers()
    tuned["blk.to_v.weight"] = tuned["blk.to_v.weight"].to(torch.int8)
    with pytest.raises(errors.DTypeError, match=r"blk\.to_v\.weight is torch\.float32"):
        extract_adapter(*_pair(tmp_path, base, tuned), tmp_path / "out.safetensors", rank=2)


@pytest.mark.parametrize(
    ("dtype", "size", "wider"),
    [("float16", 1e12, "float32"), ("bfloat16", 1e80, "float64"), ("float32", 1e80, "float64")],
)
def test_extract_factors_that_overflow_their_dtype_are_named_by_key(tmp_path, dtype, size, wider):
    """Factors ≈ √size per entry overflow `dtype`; the error names the key and the dtype
    with the larger range (bfloat16's is float32's, so float64)."""
    base, tuned = _two_layers()
    g = torch.Generator().manual_seed(5)
    low_rank = torch.randn(8, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 6, generator=g, dtype=torch.float64
    )
    tuned["blk.to_v.weight"] = base["blk.to_v.weight"].double() + size * low_rank
    with pytest.raises(errors.NonFiniteError, match=r"blk\.to_v\.weight: the factors") as info:
        extract_adapter(*_pair(tmp_path, base, tuned), tmp_path / "out.safetensors", rank=2,
                        dtype=dtype, format="kohya")  # fmt: skip
    assert f"--dtype {wider})" in str(info.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_extract_from_a_conv1d_model_refuses_diffusers_output(tmp_path):
    """GPT-2's Conv1D weights are (in, out): a diffusers file's module LoRA of them would be
    read transposed, so a square layer would load with ΔWᵀ and no error. A config.json that
    names no model transformers builds tells them by GPT-2's layer names."""
    g = torch.Generator().manual_seed(4)
    names = ("h.0.attn.c_attn", "h.0.mlp.c_proj")
    base = {f"{n}.weight": torch.randn(8, 8, generator=g) for n in names}
    tuned = {k: v + 0.1 * torch.randn(8, 8, generator=g) for k, v in base.items()}
    base, tuned = _pair(tmp_path, base, tuned)
    for path in (base, tuned):
        (path.parent / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(errors.ConversionError, match="Conv1D"):
        extract_adapter(base, tuned, tmp_path / "d", rank=2, format="diffusers")
    extract_adapter(base, tuned, tmp_path / "k.safetensors", rank=2, format="kohya")


def _tiny_gpt2(n_layer: int):
    """A GPT-2 config of width 32 and its model (seeded, eval mode): `Conv1D` layers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=n_layer, n_head=2, vocab_size=64,
                                     n_positions=16)  # fmt: skip
    torch.manual_seed(0)
    return config, transformers.GPT2LMHeadModel(config).eval()


def test_extract_from_gpt2_loads_in_peft_as_parameter_targets(tmp_path):
    """GPT-2 (transformers `Conv1D`, weights `(in, out)`): the PEFT folder names its layers in
    `target_parameters`, so PEFT adds ΔW to each weight as stored, and the fine-tune's
    logits come back."""
    peft = pytest.importorskip("peft")
    config, model = _tiny_gpt2(n_layer=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tuned = dict(base)
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        rows, cols = base[key].shape
        change = torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
        tuned[key] = base[key] + change
    paths = []
    for name, state in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied to wte
        paths.append(save_state(state, tmp_path / name / "model.safetensors"))
        config.to_json_file(tmp_path / name / "config.json")
    extract_adapter(*paths, tmp_path / "peft", rank=2, format="peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(
        ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"]
    )
    ids = torch.randint(0, 64, (2, 8), generator=g)
    model.load_state_dict(tuned)
    expected = model(ids).logits
    model.load_state_dict(base)
    loaded = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft"))
    assert rel(loaded(ids).logits, expected) < 1e-5


def test_a_gpt2_kohya_file_converts_to_peft_parameter_targets_with_its_base(tmp_path):
    """With the GPT-2 checkpoint as base, a kohya file of its (in, out) weights becomes a PEFT
    folder of parameter targets that PEFT applies as `lowrank merge` does; diffusers output
    is refused, as it would be read transposed."""
    peft = pytest.importorskip("peft")
    config, model = _tiny_gpt2(n_layer=1)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    (tmp_path / "base").mkdir()
    base = save_state(state, tmp_path / "base" / "model.safetensors")
    config.to_json_file(tmp_path / "base" / "config.json")
    g = torch.Generator().manual_seed(1)
    layer = LoRA(torch.randn(2, 96, generator=g), torch.randn(32, 2, generator=g), 0.5)
    save_adapter(Adapter({"transformer.h.0.attn.c_attn": layer}), tmp_path / "k.safetensors",
                 "kohya")  # fmt: skip
    merge_checkpoint(base, tmp_path / "k.safetensors", tmp_path / "merged.safetensors")
    ids = torch.randint(0, 64, (2, 8), generator=g)
    merged = copy.deepcopy(model)
    merged.load_state_dict(load_file(str(tmp_path / "merged.safetensors")), strict=False)
    merged.tie_weights()
    with pytest.raises(errors.ConversionError, match="Conv1D"):
        convert_adapter(tmp_path / "k.safetensors", tmp_path / "d", to="diffusers", base=base)
    convert_adapter(tmp_path / "k.safetensors", tmp_path / "p", to="peft", base=base)
    convert_adapter(tmp_path / "k.safetensors", tmp_path / "q", to="peft", base={"unet": base})
    for folder in ("p", "q"):  # one base, or one per component
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / folder))
        assert rel(loaded(ids).logits, merged(ids).logits) < 1e-5, folder


def _kohya_delta64(state: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    """ΔW of one kohya layer from its tensors alone: alpha / r · up down, in float64."""
    down, up = state[f"{stem}.lora_down.weight"].double(), state[f"{stem}.lora_up.weight"].double()
    return float(state[f"{stem}.alpha"]) / down.shape[0] * up @ down


def test_a_peft_folder_combines_with_a_pipeline_file_given_bases_per_component(tmp_path):
    """A PEFT folder names no component; beside a kohya file of a UNet and a text encoder,
    with a base per component, `component` says which model its layers belong to (or the
    only component given does). The sum equals the float64 one of the files' own tensors."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q", nn.Linear(16, 12))
    model.add_module("v", nn.Linear(12, 16))
    base = save_state(model.state_dict(), tmp_path / "base.safetensors")
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8,
                                                                        target_modules=["q", "v"]))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_()
    wrapped.save_pretrained(str(tmp_path / "peft"))
    peft_state = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(1)
    kohya = {}
    for stem in ("lora_unet_q", "lora_te_q"):
        kohya |= {f"{stem}.lora_down.weight": torch.randn(2, 16, generator=g),
                  f"{stem}.lora_up.weight": torch.randn(12, 2, generator=g),
                  f"{stem}.alpha": torch.tensor(1.0)}  # fmt: skip
    save_file(kohya, str(tmp_path / "pipeline.safetensors"))
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_unet")},
              str(tmp_path / "unet.safetensors"))  # fmt: skip

    def peft_delta64(module: str) -> torch.Tensor:
        key = f"base_model.model.{module}.lora_{{}}.weight"
        return 2.0 * peft_state[key.format("B")].double() @ peft_state[key.format("A")].double()

    bases = {"unet": base, "text_encoder": base}
    combine_adapters([tmp_path / "pipeline.safetensors", tmp_path / "peft"], tmp_path / "out",
                     weights=[1.0, 0.5], base=bases, component="unet", format="kohya")  # fmt: skip
    out = load_file(str(tmp_path / "out"))
    expected = {
        "lora_unet_q": _kohya_delta64(kohya, "lora_unet_q") + 0.5 * peft_delta64("q"),
        "lora_unet_v": 0.5 * peft_delta64("v"),
        "lora_te_q": _kohya_delta64(kohya, "lora_te_q"),
    }
    assert {k.partition(".")[0] for k in out} == expected.keys()
    for stem, delta in expected.items():
        assert rel(_kohya_delta64(out, stem), delta) < 1e-6, stem
    combine_adapters([tmp_path / "unet.safetensors", tmp_path / "peft"], tmp_path / "one",
                     base={"unet": base}, format="kohya")  # fmt: skip
    one = load_file(str(tmp_path / "one"))
    assert rel(_kohya_delta64(one, "lora_unet_v"), peft_delta64("v")) < 1e-6
    with pytest.raises(errors.TargetError, match=r"component= \(--component\)"):
        combine_adapters([tmp_path / "pipeline.safetensors", tmp_path / "peft"], tmp_path / "no",
                         base=bases, format="kohya")  # fmt: skip
    assert not (tmp_path / "no").exists()


def test_extract_from_a_float8_base_against_a_bfloat16_fine_tune(tmp_path):
    """float8 has no type promotion in torch; Δ is taken in float32 all the same."""
    base, tuned = _two_layers()
    base = {k: v.to(torch.float8_e4m3fn) for k, v in base.items()}
    tuned = {k: v.to(torch.bfloat16) for k, v in tuned.items()}
    report = extract_adapter(*_pair(tmp_path, base, tuned), tmp_path / "out.safetensors",
                             rank=6, format="kohya", dtype="float32")  # fmt: skip
    merge_checkpoint(tmp_path / "ckpt" / "base" / "model.safetensors", tmp_path / "out.safetensors",
                     tmp_path / "merged.safetensors", dtype="float32")  # fmt: skip
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for key, value in tuned.items():
        assert rel(merged[key], value.float()) < 1e-6, key
    assert len(report["layers"]) == 2


@pytest.mark.parametrize("to", ["kohya", "lycoris"])
def test_a_rank_no_layer_needs_is_refused_with_advice_that_fits_the_file(kohya, tmp_path, to):
    """A rank is refused where no layer needs it: a LoRA-only file says it has no LoHa / LoKr
    layer, and a LoHa file written as LyCORIS points to the formats that would use it."""
    with pytest.raises(errors.RankError, match="has no LoHa, LoKr or Full layer") as info:
        convert_adapter(kohya["path"], tmp_path / "o.safetensors", to, rank=2)
    assert "convert to" not in str(info.value)
    g = torch.Generator().manual_seed(0)
    half = LoRA(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g))
    save_adapter(Adapter({"blk": LoHa(half, half, 0.5)}), tmp_path / "h.safetensors", "lycoris")
    with pytest.raises(errors.RankError, match="convert to peft, kohya or diffusers"):
        convert_adapter(tmp_path / "h.safetensors", tmp_path / "o.safetensors", "lycoris", rank=2)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("size", [1e-170, 1e170])
def test_extract_reports_the_error_of_float64_differences_of_any_magnitude(tmp_path, size):
    """A float64 Δ of entries near 1e±170 has squared norms beyond float64's range (they
    vanish or overflow); the reported error is still Eckart–Young's, computed here on Δ
    divided by its magnitude."""
    g = torch.Generator().manual_seed(6)
    base = {"blk.to_q.weight": torch.randn(8, 6, generator=g, dtype=torch.float64) * size}
    shift = torch.randn(8, 6, generator=g, dtype=torch.float64)
    tuned = {"blk.to_q.weight": base["blk.to_q.weight"] + shift * size}
    paths = _pair(tmp_path, base, tuned)
    report = extract_adapter(*paths, tmp_path / "out.safetensors", rank=2, format="kohya")
    values = torch.linalg.svdvals((tuned["blk.to_q.weight"] - base["blk.to_q.weight"]) / size)
    optimal = float(values[2:].norm() / values.norm())
    assert report["layers"][0]["relative_error"] == pytest.approx(optimal, rel=1e-9)


@pytest.mark.parametrize("size", [1e-90, 1e90])
def test_convert_reports_the_error_of_loha_layers_of_any_magnitude(tmp_path, size):
    """A float64 LoHa whose ΔW is near 1e±180: `convert --rank` reports Eckart–Young's error,
    not 0 or NaN from squared norms that leave float64's range."""
    g = torch.Generator().manual_seed(7)
    halves = [
        LoRA(torch.randn(3, 5, generator=g, dtype=torch.float64) * size,
             torch.randn(6, 3, generator=g, dtype=torch.float64))
        for _ in range(2)
    ]  # fmt: skip
    path = tmp_path / "loha.safetensors"
    save_adapter(Adapter({"fc": LoHa(*halves)}), path, "lycoris")
    delta = (halves[0].up @ halves[0].down / size) * (halves[1].up @ halves[1].down / size)
    values = torch.linalg.svdvals(delta)
    optimal = float(values[2:].norm() / values.norm())
    report = convert_adapter(path, tmp_path / "k.safetensors", "kohya", rank=2, base={"fc": (6, 5)})
    assert report["approximated"][0]["relative_error"] == pytest.approx(optimal, rel=1e-9)


@pytest.mark.parametrize("size", [1.0, 1e-170, 1e170])
@pytest.mark.parametrize("fmt", ["kohya", "lycoris"])
def test_extract_tucker2_by_energy_keeps_the_share_at_any_magnitude(tmp_path, size, fmt):
    """`energy=0.8` gives Tucker layers keeping ≥ 80 % of ‖Δ‖², measured here from the stored
    factors (einsum) against Δ, both divided by its magnitude, for a float64 Δ whose squared
    norm leaves float64's range too."""
    g = torch.Generator().manual_seed(1)
    base = {"blk.conv.weight": torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64) * size}
    shift = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    tuned = {"blk.conv.weight": base["blk.conv.weight"] + shift * size}
    out = tmp_path / "t.safetensors"
    extract_adapter(*_pair(tmp_path, base, tuned), out, energy=0.8, form="tucker2", format=fmt)
    (form,) = dict(load_adapter(out, base={"blk.conv": (6, 5, 3, 3)}).select().items()).values()
    assert isinstance(form, Tucker2)
    scaled = Tucker2(form.down / size, form.mid, form.up, form.scale)
    delta = (tuned["blk.conv.weight"] - base["blk.conv.weight"]) / size
    assert 1 - rel(delta64(scaled), delta) ** 2 >= 0.8


@pytest.mark.parametrize("size", [1e-170, 1e170])
def test_a_dense_lokr_weights_error_is_reported_at_any_magnitude(tmp_path, size):
    """A float64 LoKr with dense `w1` near 1e±170 (norms whose squares leave float64) carried
    over at weight 0.3: the reported error is its rounding, as measured by the definition
    with `w1` divided by its magnitude, not inf or NaN."""
    g = torch.Generator().manual_seed(8)
    w1 = torch.randn(2, 2, generator=g, dtype=torch.float64) * size
    form = LoKr(w1, torch.randn(3, 4, generator=g, dtype=torch.float64))
    report = combine_adapters([Adapter({"blk": form})], tmp_path / "a.safetensors", [0.3],
                              format="lycoris")  # fmt: skip
    stored = only_layer(tmp_path / "a.safetensors")
    measured = rel(
        stored.scale * lokr_delta64(stored.w1 / size, stored.w2),
        0.3 * lokr_delta64(w1 / size, form.w2),
    )
    assert measured < 1e-15 and report["layers"][0]["relative_error"] < 1e-15


KOHYA_ALPHAS = {  # how other tools store a module's alpha: dtypes, 0-d and 1-element
    "lin": torch.tensor(3.0, dtype=torch.float16),
    "conv": torch.tensor([0.1], dtype=torch.float16),  # 0.0999755859375 as stored
    "proj": torch.tensor([5.0]),
}


@pytest.mark.parametrize("other", [torch.tensor(0.7, dtype=torch.bfloat16), torch.tensor(4)],
                         ids=["bfloat16", "int64"])  # fmt: skip
def test_kohya_alphas_of_any_dtype_and_shape_merge_resize_and_combine_as_stored(
    tmp_path, other
):
    """A LyCORIS / kohya file whose per-module alphas are float16, bfloat16 or integer
    scalars, 0-d or 1-element, merges as lycoris-lora merges it (`merge_to`) and to the
    float64 `W + alpha / r · up @ down` with alpha as stored; combined at weights 0.5 and
    2, resized to a rank above the file's and converted to PEFT (which loads it to the
    same weights), it keeps that exactly."""
    lycoris = pytest.importorskip("lycoris")
    peft = pytest.importorskip("peft")
    from io_helpers import net

    base = net()
    plain = base.state_dict()
    checkpoint = save_state(plain, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(4)
    tensors, want = {}, {}
    alphas = {**KOHYA_ALPHAS, "lin": other}
    for name, alpha in alphas.items():
        weight = plain[f"{name}.weight"]
        down = torch.randn(3, *weight.shape[1:], generator=g)
        up = torch.randn(weight.shape[0], 3, *([1] * (weight.ndim - 2)), generator=g)
        stem = f"lycoris_{name}"
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": alpha}  # fmt: skip
        delta = up.double().flatten(1) @ down.double().flatten(1)
        want[name] = float(alpha.double().sum()) / 3 * delta.reshape(weight.shape)
    lora = tmp_path / "lora.safetensors"
    save_file(tensors, str(lora))
    theirs = net()
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(lora), theirs)
    network.merge_to()

    def merged_delta(path, weight=1.0):
        merge_checkpoint(checkpoint, path, tmp_path / "m.safetensors", weights=[weight])
        merged = load_file(str(tmp_path / "m.safetensors"))
        return {n: merged[f"{n}.weight"].double() - plain[f"{n}.weight"].double() for n in want}

    first = merged_delta(lora)
    for name, delta in want.items():
        assert rel(first[name], delta) < 1e-6, name
        lycoris_delta = theirs.state_dict()[f"{name}.weight"].double() - plain[f"{name}.weight"]
        assert rel(lycoris_delta, delta) < 1e-5, name
    for weight in (0.5, 2.0):
        combine_adapters([lora], tmp_path / "c.safetensors", weights=[weight])
        got = merged_delta(tmp_path / "c.safetensors")
        assert all(rel(got[n], weight * d) < 1e-6 for n, d in want.items()), weight
    combine_adapters([lora, lora], tmp_path / "c2.safetensors", weights=[0.5, 2.0])
    got = merged_delta(tmp_path / "c2.safetensors")
    assert all(rel(got[n], 2.5 * d) < 1e-6 for n, d in want.items())
    resize_adapter(lora, tmp_path / "r.safetensors", 8)
    got = merged_delta(tmp_path / "r.safetensors")
    assert all(rel(got[n], d) < 1e-6 for n, d in want.items())
    convert_adapter(lora, tmp_path / "peft", "peft", base=checkpoint)
    loaded = peft.PeftModel.from_pretrained(net(), tmp_path / "peft").merge_and_unload()
    for name, delta in want.items():
        got = loaded.state_dict()[f"{name}.weight"].double() - plain[f"{name}.weight"].double()
        assert rel(got, delta) < 1e-5, name


class _Three(nn.Module):
    """Two linear layers and a 3×3 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 10)
        self.c = nn.Conv2d(10, 6, 3, padding=1)


def test_peft_rank_and_alpha_patterns_combine_and_resize_as_peft_loads_them(tmp_path):
    """PEFT folders with per-module ranks and alphas (`rank_pattern`, `alpha_pattern`, one
    rsLoRA): combined at weights (0.5, 2) and (1, −1), PEFT loads the result to the
    weighted sum of PEFT's own merges of the inputs (float64); resized to rank 1 and to a
    rank above every layer's, PEFT loads it to the float64 best rank-1 truncation of each
    layer's ΔW, and to ΔW itself."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Three()
    plain = {k: v.double() for k, v in base.state_dict().items()}
    deltas = []
    for index, settings in enumerate([
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"^b$": 2, "c": 3}, "alpha_pattern": {"b": 3},
         "use_rslora": True},
        {"r": 2, "lora_alpha": 1, "alpha_pattern": {"c": 7}, "target_modules": ["a", "c"]},
    ]):  # fmt: skip
        config = peft.LoraConfig(init_lora_weights=False,
                                 **{"target_modules": ["a", "b", "c"], **settings})  # fmt: skip
        model = peft.get_peft_model(copy.deepcopy(base), config)
        model.save_pretrained(tmp_path / f"p{index}")
        merged = model.merge_and_unload().state_dict()
        deltas.append({n: merged[f"{n}.weight"].double() - plain[f"{n}.weight"] for n in "abc"})

    def loaded_deltas(folder):
        merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()
        state = merged.state_dict()
        return {n: state[f"{n}.weight"].double() - plain[f"{n}.weight"] for n in "abc"}

    for weights in ((0.5, 2.0), (1.0, -1.0)):
        out = tmp_path / f"c{weights}"
        combine_adapters([tmp_path / "p0", tmp_path / "p1"], out, weights=list(weights))
        got = loaded_deltas(out)
        for n in "abc":
            want = weights[0] * deltas[0][n] + weights[1] * deltas[1][n]
            assert rel(got[n], want) < 1e-6, (weights, n)
    resize_adapter(tmp_path / "p0", tmp_path / "r1", 1)
    resize_adapter(tmp_path / "p0", tmp_path / "r9", 9)
    got, kept = loaded_deltas(tmp_path / "r1"), loaded_deltas(tmp_path / "r9")
    for n, delta in deltas[0].items():
        u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
        best = (s[0] * torch.outer(u[:, 0], vh[0])).reshape(delta.shape)
        assert rel(got[n], best) < 1e-5, n
        assert rel(kept[n], delta) < 1e-6, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extract_skips_layers_a_fine_tune_only_stored_in_a_narrower_dtype(tmp_path, dtype):
    """A float32 base and a fine-tune saved in bfloat16 / float16: every weight the fine-tune
    did not change is the base rounded to that dtype, which is no change (a dtype alone),
    not a difference to write as rank-r rounding noise. The one changed layer is the
    Eckart–Young truncation of tuned − base (float64 SVD), and PEFT, merging the folder
    into the float32 base, leaves every other weight as it was."""
    peft = pytest.importorskip("peft")
    model = tiny()
    base = model.state_dict()
    tuned = {k: v.clone() for k, v in base.items()}
    g = torch.Generator().manual_seed(3)
    changed = "down_blocks.0.attn.to_q"
    tuned[f"{changed}.weight"] += torch.randn(8, 2, generator=g) @ torch.randn(2, 8, generator=g)
    tuned["down_blocks.1.norm.weight"] += 0.5
    paths = _pair(tmp_path, base, {k: v.to(dtype) if v.is_floating_point() else v
                                   for k, v in tuned.items()})  # fmt: skip
    report = extract_adapter(*paths, tmp_path / "ad", rank=2)
    assert [row["name"] for row in report["layers"]] == [changed]
    assert sorted(report["skipped"]) == sorted(set(targets(model)) - {changed})
    assert report["other_changes"] == ["down_blocks.1.norm.weight"]
    merged = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "ad")).merge_and_unload()
    for key, value in merged.state_dict().items():
        if key.endswith(".weight") and key.removesuffix(".weight") != changed:
            assert torch.equal(value, base[key]), key
    key = f"{changed}.weight"
    best, _ = truncation(tuned[key].to(dtype).double() - base[key].double(), 2)
    got = merged.state_dict()[key].double() - base[key].double()
    assert rel(got, best) < 1e-2


@pytest.mark.parametrize("fmt", ["kohya", "lycoris", "diffusers"])
def test_extract_refuses_a_whole_single_file_checkpoint_for_named_formats(tmp_path, fmt):
    """An original single-file Stable Diffusion checkpoint holds the UNet under
    `model.diffusion_model.`, the text encoder and the VAE beside it. Its keys as they are
    would name kohya layers `lora_unet_model_diffusion_model_input_blocks_…` (and the text
    encoder's and VAE's layers `lora_unet_…` too), which ComfyUI and sd-scripts look up as
    `lora_unet_input_blocks_…` / `lora_te_…`: refused, naming the prefix, nothing written.
    The UNet's own weights (the prefix stripped) give the names those loaders read."""
    g = torch.Generator().manual_seed(5)
    prefix = "model.diffusion_model."
    unet = {"input_blocks.1.1.proj_in.weight": torch.randn(8, 8, 1, 1, generator=g),
            "input_blocks.1.0.in_layers.2.weight": torch.randn(8, 8, 3, 3, generator=g)}
    whole = {prefix + k: v for k, v in unet.items()}
    whole["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = (
        torch.randn(8, 8, generator=g)
    )
    whole["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=g)
    moved = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in whole.items()}
    paths = _pair(tmp_path, whole, moved)
    out = tmp_path / ("o" if fmt == "diffusers" else "o.safetensors")
    refused = pytest.raises(errors.TargetError, match=r"'model\.diffusion_model\.'")
    with Unchanged(tmp_path, paths), refused:
        extract_adapter(*paths, out, rank=2, format=fmt)
    if fmt == "kohya":
        own = {k.removeprefix(prefix): v for k, v in moved.items() if k.startswith(prefix)}
        own = _pair(tmp_path, unet, own, "unet")
        extract_adapter(*own, out, rank=2, format=fmt)
        assert {k.split(".")[0] for k in load_file(str(out))} == {
            "lora_unet_input_blocks_1_1_proj_in", "lora_unet_input_blocks_1_0_in_layers_2"}


def _tiny_qwen2(tie: bool):
    """A one-layer transformers Qwen2 (hidden 16, vocabulary 32), seeded, its table tied to
    its head or not."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=32, tie_word_embeddings=tie)  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config)


def test_extract_refuses_a_table_tied_to_the_output_layer_and_extracts_it_untied(tmp_path):
    """A Qwen2 whose LM head is its embedding table (`tie_word_embeddings`, the head's
    tensor omitted): a fine-tune of the table changed both, but an adapter on it changes
    the lookup alone under PEFT (which leaves the head as the base's), and merges refuse
    tied weights. Extracting the table is refused, naming the tie, nothing written. Saved
    untied, table and head are extracted, and PEFT runs the fine-tune's logits."""
    pytest.importorskip("peft")

    def pair(tie: bool) -> list:
        model = _tiny_qwen2(tie=tie)
        g = torch.Generator().manual_seed(6)
        model.save_pretrained(tmp_path / f"base-{tie}")
        with torch.no_grad():
            change = torch.randn(32, 2, generator=g) @ torch.randn(2, 16, generator=g)
            model.model.embed_tokens.weight += change
            if not tie:
                model.lm_head.weight += change
        model.save_pretrained(tmp_path / f"tuned-{tie}")
        return [tmp_path / f"base-{tie}", tmp_path / f"tuned-{tie}", model]

    *paths, _ = pair(tie=True)
    refused = pytest.raises(errors.ConversionError, match=r"lm_head\.weight")
    with Unchanged(tmp_path, [p / "model.safetensors" for p in paths]), refused:
        extract_adapter(*paths, tmp_path / "tied", rank=2, targets="embed_tokens")
    *paths, tuned = pair(tie=False)
    report = extract_adapter(*paths, tmp_path / "untied", rank=2, targets="embed_tokens,lm_head")
    assert sorted(row["name"] for row in report["layers"]) == ["lm_head", "model.embed_tokens"]
    assert _peft_logits_error(paths[0], tmp_path / "untied", tuned) < 1e-5


def _peft_logits_error(base: os.PathLike, folder: os.PathLike, tuned: torch.nn.Module) -> float:
    """The relative error of PEFT's logits, the Qwen2 saved at `base` run with the adapter
    `folder`, against `tuned`'s (a fine-tune of it)."""
    import peft
    import transformers

    loaded = peft.PeftModel.from_pretrained(
        transformers.Qwen2ForCausalLM.from_pretrained(base), str(folder)
    ).eval()
    tokens = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        return rel(loaded(tokens).logits, tuned.eval()(tokens).logits)


def test_extract_passes_over_a_tied_head_stored_unchanged(tmp_path):
    """A Qwen2 with `tie_word_embeddings` whose checkpoints store the head as its own copy
    of the table (`lm_head.weight` beside `embed_tokens.weight`), a fine-tune of `q_proj`
    only: the head is no changed weight, so nothing is refused for its tie, and PEFT runs
    the folder to the fine-tune's logits."""
    pytest.importorskip("peft")
    model = _tiny_qwen2(tie=True)
    paths = []
    for name in ("base", "tuned"):
        model.save_pretrained(tmp_path / name)
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()},
                  str(tmp_path / name / "model.safetensors"))  # fmt: skip
        paths.append(tmp_path / name)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight += 0.1
    with torch.no_grad():  # the tuned checkpoint holds one change
        model.model.layers[0].self_attn.q_proj.weight -= 0.1
    assert "lm_head.weight" in load_file(str(paths[1] / "model.safetensors"))
    report = extract_adapter(*paths, tmp_path / "out", rank=16)
    assert [row["name"] for row in report["layers"]] == ["model.layers.0.self_attn.q_proj"]
    assert _peft_logits_error(paths[0], tmp_path / "out", model) < 1e-5


def test_extract_saves_changed_biases_and_norms_whole_for_peft(tmp_path):
    """A Qwen2 fine-tune that also moved a projection's bias and two norms: with
    `whole=True` the PEFT folder saves them as PEFT does (the adapted module's bias as
    `bias="lora_only"`'s `base_layer.bias`, the norms as `modules_to_save`), and PEFT loads
    it to the fine-tune's logits (and `lowrank merge` to its weights); without, PEFT's
    logits miss them. Kohya files hold no
    whole tensors: refused, nothing written."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _tiny_qwen2(tie=False).eval()
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        attention = model.model.layers[0].self_attn
        attention.q_proj.weight += torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)
        attention.q_proj.bias += torch.randn(16, generator=g)
        model.model.layers[0].input_layernorm.weight += 0.5
        model.model.norm.weight -= 0.25
    model.save_pretrained(tmp_path / "tuned")
    paths = [tmp_path / "base", tmp_path / "tuned"]
    tokens = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        want = model(tokens).logits
    for whole in (False, True):
        out = tmp_path / f"ad-{whole}"
        report = extract_adapter(*paths, out, rank=2, whole=whole)
        assert [row["name"] for row in report["layers"]] == ["model.layers.0.self_attn.q_proj"]
        base = transformers.Qwen2ForCausalLM.from_pretrained(paths[0])
        loaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
        with torch.no_grad():
            assert (rel(loaded(tokens).logits, want) < 1e-5) == whole
    merge_checkpoint(paths[0], out, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=key)
    refused = pytest.raises(errors.ArgumentError, match="whole")
    with Unchanged(tmp_path, [p / "model.safetensors" for p in paths]), refused:
        extract_adapter(*paths, tmp_path / "k.safetensors", rank=2, format="kohya", whole=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_interval_is_the_reals_that_round_to_each_value(dtype):
    """Every finite float16 and bfloat16 value: the interval `_rounding_interval` derives
    from the dtype's eps is the one between the midpoints to its two neighbours
    (`torch.nextafter`), and torch rounds reals at its ends, just inside, to it (nudged by
    more than float32's step: torch rounds float64 to these dtypes through float32)."""
    from lowrank.io.factor_tools import _rounding_interval

    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values)]
    low, high = _rounding_interval(values)
    inf = torch.full_like(values, math.inf)
    x = values.double()
    for bound, neighbour in ((low, torch.nextafter(values, -inf)),
                             (high, torch.nextafter(values, inf))):  # fmt: skip
        finite = torch.isfinite(neighbour)
        assert torch.equal(bound[finite], (x[finite] + neighbour[finite].double()) / 2)
        inside = bound + (x - bound) * 1e-3
        assert torch.equal(inside.to(dtype)[finite], values[finite])
    # past the largest value: up to half its binade's step rounds to it, as torch rounds
    top = values == torch.finfo(dtype).max
    assert torch.equal((high[top] * (1 - 1e-6)).to(dtype), values[top])
    assert torch.isinf((high[top] * (1 + 1e-6)).to(dtype)).all()


@pytest.mark.parametrize(
    "dtypes",
    [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
     (torch.float16, torch.float32)],
    ids=lambda pair: "-".join(str(d).removeprefix("torch.") for d in pair),
)  # fmt: skip
def test_extract_takes_the_rounding_between_two_dtypes_as_no_change(tmp_path, dtypes):
    """A float32 Qwen2 saved as float16 for the base and, after a fine-tune, as bfloat16
    (or the other way round, or kept in float32 over a float16 release): every untouched
    weight differs by the dtypes' rounding, which is no change, so `lm_head`, the table, the
    biases and the norms get no layer of rounding noise. The fine-tune — a rank-1 update of
    relative size 1e-3 on `q_proj`, and one entry of the final norm moved by 0.05 (six
    bfloat16 steps) — is found. Extracted at full rank in float64, with the norm saved
    whole, PEFT merges the folder into the float64 base to the model that is the base with
    the tuned `q_proj` weight and norm (float64 logits), which is as near the fine-tune's
    logits as the base's other weights allow."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _tiny_qwen2(tie=False).eval()
    base = {k: v.to(dtypes[0]) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(8)
    changed = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        weight = model.get_submodule(changed).weight
        update = torch.outer(torch.randn(16, generator=g), torch.randn(16, generator=g))
        weight += update * (1e-3 * weight.norm() / update.norm())
        model.model.norm.weight[3] += 0.05
    tuned = {k: v.to(dtypes[1]) for k, v in model.state_dict().items()}
    paths = _pair(tmp_path, base, tuned)
    report = extract_adapter(*paths, tmp_path / "ad", rank=16, dtype="float64", whole=True)
    assert [row["name"] for row in report["layers"]] == [changed]
    assert report["other_changes"] == ["model.norm.weight"] and report["embeddings"] == []

    def logits(state: dict) -> torch.Tensor:
        model64 = transformers.Qwen2ForCausalLM(model.config).double().eval()
        model64.load_state_dict({k: v.double() for k, v in state.items()})
        with torch.no_grad():
            return model64(torch.arange(12).reshape(1, 12)).logits

    base64 = transformers.Qwen2ForCausalLM(model.config).double().eval()
    base64.load_state_dict({k: v.double() for k, v in base.items()})
    merged = peft.PeftModel.from_pretrained(base64, str(tmp_path / "ad")).merge_and_unload()
    with torch.no_grad():
        got = merged.eval()(torch.arange(12).reshape(1, 12)).logits
    keys = (f"{changed}.weight", "model.norm.weight")
    want = logits({k: tuned[k] if k in keys else v for k, v in base.items()})
    assert rel(got, want) < 1e-12
    assert rel(got, logits(tuned)) <= rel(want, logits(tuned)) + 1e-12


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [({"blk.to_q.bias": torch.tensor([math.nan] + [0.0] * 7)}, errors.NonFiniteError,
      r"tuned.*blk\.to_q\.bias holds 1 NaN"),
     ({"blk.to_q.bias": torch.ones(9)}, errors.ShapeError, r"blk\.to_q\.bias has shape \(9,\)"),
     ({"blk.norm.weight": torch.ones(6)}, errors.ConversionError,
      r"blk\.norm\.weight is in .* but not in")],
    ids=["nan", "shape", "new"],
)  # fmt: skip
def test_extract_whole_refuses_tensors_peft_would_not_load(tmp_path, changes, error, match):
    """`whole=True`: a NaN in a changed bias of the fine-tune is a `NonFiniteError`, a bias
    whose shape differs from the base's a `ShapeError`, a norm the base lacks a
    `ConversionError` (PEFT loads saved tensors in place of the base's), each naming the
    key; nothing written. Without `whole` the change is listed."""
    base, tuned = _two_layers()
    base["blk.to_q.bias"] = torch.zeros(8)
    paths = _pair(tmp_path, base, {**tuned, "blk.to_q.bias": torch.zeros(8), **changes})
    with Unchanged(tmp_path, paths), pytest.raises(error, match=match):
        extract_adapter(*paths, tmp_path / "out", rank=2, whole=True)
    report = extract_adapter(*paths, tmp_path / "listed", rank=2)
    assert report["other_changes"] == list(changes) and report["saved_whole"] == []


@pytest.mark.parametrize(
    ("fmt", "reason"),
    [("kohya", "LoRA factors only"), ("diffusers", "LoRA factors of modules only"),
     ("lycoris", r"drops a bias difference \(diff_b\) beside LoRA factors")],
)  # fmt: skip
def test_extract_whole_refuses_formats_but_peft_saying_why(tmp_path, fmt, reason):
    """kohya and diffusers files hold factors only, and LyCORIS' own loader would not load
    what a LyCORIS file would hold (`test_lycoris_cannot_load_the_changes_whole_would_save`):
    an `ArgumentError` saying so, nothing written."""
    paths = _pair(tmp_path, *_two_layers())
    out = tmp_path / ("d" if fmt == "diffusers" else f"{fmt}.safetensors")
    with Unchanged(tmp_path, paths), pytest.raises(errors.ArgumentError, match=reason):
        extract_adapter(*paths, out, rank=2, format=fmt, whole=True)


def test_lycoris_cannot_load_the_changes_whole_would_save():
    """Why `whole=True` refuses LyCORIS output, checked against lycoris-lora itself: its
    loader drops a `diff_b` beside LoRA factors (the bias stays the base's), fails on a
    `diff_b` alone and on a norm's 1-D `diff`, and its norm module (`w_norm`, `b_norm`)
    loads on a `LayerNorm` but not on an `RMSNorm`."""
    lycoris = pytest.importorskip("lycoris")
    g = torch.Generator().manual_seed(9)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.ln, self.rms = nn.Linear(4, 4), nn.LayerNorm(4), nn.RMSNorm(4)

    def loaded(weights: dict) -> tuple[Block, Block]:
        model = Block().double()
        merged = copy.deepcopy(model)
        network, _ = lycoris.create_lycoris_from_weights(1.0, None, merged, weights_sd=weights)
        network.merge_to(1.0)
        return model, merged

    lora = {"lycoris_lin.lora_up.weight": torch.randn(4, 2, generator=g, dtype=torch.float64),
            "lycoris_lin.lora_down.weight": torch.randn(2, 4, generator=g, dtype=torch.float64),
            "lycoris_lin.alpha": torch.tensor(2.0), "lycoris_lin.diff_b": torch.ones(4),
            "lycoris_ln.w_norm": torch.full((4,), 0.5, dtype=torch.float64),
            "lycoris_ln.b_norm": torch.full((4,), 0.25, dtype=torch.float64)}  # fmt: skip
    model, merged = loaded({k: v.double() for k, v in lora.items()})
    assert not torch.equal(merged.lin.weight, model.lin.weight)
    assert torch.equal(merged.lin.bias, model.lin.bias)  # the diff_b dropped
    assert torch.equal(merged.ln.weight, model.ln.weight + 0.5)
    assert torch.equal(merged.ln.bias, model.ln.bias + 0.25)
    for weights in ({"lycoris_lin.diff_b": torch.ones(4)}, {"lycoris_ln.diff": torch.ones(4)},
                    {"lycoris_rms.w_norm": torch.ones(4)}):  # fmt: skip
        with pytest.raises((AttributeError, ValueError)):
            loaded({k: v.double() for k, v in weights.items()})


_FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


def _every_value(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of the 8- or 16-bit floating `dtype`, from all its bit patterns,
    sorted and distinct (±0 as one), in float64."""
    bits = torch.finfo(dtype).bits
    patterns = torch.arange(2**bits, dtype=torch.int32)
    raw = patterns.to(torch.uint8) if bits == 8 else patterns.to(torch.int16)
    values = raw.view(dtype).to(torch.float64)
    return torch.unique(values[torch.isfinite(values)])


@pytest.mark.parametrize("dtype", _FLOAT8, ids=str)
def test_rounding_interval_of_every_float8_value_reaches_the_midpoints(dtype):
    """Every finite value of each float8 dtype, enumerated from its bit patterns: its
    rounding interval runs from the midpoint to its lower neighbour to the midpoint to its
    upper one (float8_e5m2fnuz, whose 2 mantissa bits step 1 to 1.25, included)."""
    from lowrank.io.factor_tools import _rounding_interval

    values = _every_value(dtype)
    low, high = _rounding_interval(values.to(dtype))
    middles = (values[1:] + values[:-1]) / 2
    assert torch.equal(low[1:], middles) and torch.equal(high[:-1], middles)


@pytest.mark.parametrize(
    ("dtype", "bits"),
    [(torch.float64, 52), (torch.float32, 23), (torch.bfloat16, 7), (torch.float16, 10),
     (torch.float8_e4m3fn, 3), (torch.float8_e4m3fnuz, 3), (torch.float8_e5m2, 2),
     (torch.float8_e5m2fnuz, 2)],
    ids=str,
)  # fmt: skip
def test_eps_is_two_to_minus_the_mantissa_bits(dtype, bits):
    """The step from 1 to the next value of each floating dtype is 2^−(its mantissa bits)."""
    from lowrank.io.factor_tools import _eps

    assert _eps(dtype) == 2.0**-bits


@pytest.mark.parametrize("wide", [*_FLOAT8, torch.float16, torch.bfloat16, torch.float32,
                                  torch.float64], ids=str)  # fmt: skip
def test_holds_is_whether_every_value_of_the_narrow_dtype_is_one_of_the_wide(wide):
    """`_holds(wide, narrow)` for every float8 dtype, float16 and bfloat16 as `narrow`:
    whether each of its finite values (all bit patterns) converts to `wide` and back
    unchanged."""
    from lowrank.io.factor_tools import _holds

    for narrow in (*_FLOAT8, torch.float16, torch.bfloat16):
        values = _every_value(narrow)
        kept = values.to(narrow).to(wide).to(torch.float64)
        assert _holds(wide, narrow) == bool(torch.equal(kept, values)), (wide, narrow)


@pytest.mark.parametrize("dtypes", [(a, b) for a in _FLOAT8 for b in _FLOAT8 if a != b], ids=str)
def test_two_float8_roundings_of_one_float32_weight_are_no_change(dtypes):
    """One float32 weight saved in two float8 dtypes (base, tuned): its entries are the
    roundings of one number, so `_same_values` finds no change; one entry moved by a few
    steps of both is a change."""
    from lowrank.io.factor_tools import _same_values

    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 4
    weight[3, 5] = 1.0
    base, tuned = weight.to(dtypes[0]), weight.to(dtypes[1])
    assert _same_values(base, tuned)
    weight[3, 5] = 1.75  # 3 steps of 1/8 or 2 of 1/4 (float8 steps at 1), no shared rounding
    assert not _same_values(base, weight.to(dtypes[1]))
