"""PEFT's LoHa and LoKr adapter types and PEFT's LoRA on an `nn.Embedding`, against the real
peft (and LyCORIS): folders PEFT writes merge and run as PEFT merges and runs them, folders
lowrank writes load in PEFT to the same outputs, and LyCORIS files become PEFT folders that
PEFT runs as LyCORIS does."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from io_helpers import rel, save_state
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank import errors
from lowrank.forms import Full, LoHa, LoKr, LoRA
from lowrank.io import (
    Adapter,
    apply_adapter,
    combine_adapters,
    convert_adapter,
    inject_adapter,
    inspect_adapter,
    load_adapter,
    merge_checkpoint,
    resize_adapter,
    save_adapter,
)
from lowrank.io.formats.peft_lycoris import factorization
from lowrank.io.report import format_report

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """A linear layer, a 3×3 and a 1×1 convolution and a 1-D convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 96)
        self.conv = nn.Conv2d(32, 48, 3, padding=1)
        self.proj = nn.Conv2d(48, 32, 1)
        self.wave = nn.Conv1d(12, 20, 3)

    def forward(self, x, image, signal):
        return self.lin(x), self.proj(self.conv(image)), self.wave(signal)


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def net2d() -> Net:
    """`net()` without its 1-D convolution (an identity), for LyCORIS, which adapts every
    convolution: PEFT cannot run a LoKr with a dense w2 on one (see below)."""
    model = net()
    model.wave = nn.Identity()
    return model


def _draw(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


INPUTS = (_draw(3, 64, seed=5), _draw(2, 32, 6, 6, seed=6), _draw(2, 12, 9, seed=7))
TARGETS = ["lin", "conv", "proj", "wave"]


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([y.flatten() for y in model(*INPUTS)])


def peft_folder(tmp_path, config, name="peft"):
    """`config`'s adapter on `net()` with random factors, saved by PEFT; its outputs and its
    `merge_and_unload` weights."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(net(), config)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, outputs(model), model.merge_and_unload().state_dict()


def peft_loads(folder, base=net) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base(), folder)


PEFT_CONFIGS = {
    "loha": lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=TARGETS, init_weights=False),
    "loha_effective_patterns": lambda: peft.LoHaConfig(
        r=4, alpha=6, target_modules=["lin", "conv", "proj"], use_effective_conv2d=True,
        rank_pattern={"conv": 2}, alpha_pattern={"proj": 3}, init_weights=False,
    ),
    "loha_effective_conv1d": lambda: peft.LoHaConfig(
        r=2, alpha=3, target_modules=TARGETS, use_effective_conv2d=True, init_weights=False
    ),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=6, target_modules=TARGETS, init_weights=False),
    "lokr_effective_conv1d": lambda: peft.LoKrConfig(
        r=2, alpha=3, target_modules=TARGETS, use_effective_conv2d=True, init_weights=False
    ),
    "lokr_both_factor_effective": lambda: peft.LoKrConfig(
        r=1, alpha=5, target_modules=["lin", "conv", "proj"], decompose_both=True,
        decompose_factor=4, use_effective_conv2d=True, init_weights=False,
    ),
    # w1 and w2 dense at r = 8: PEFT's scale is still alpha / r (LyCORIS' would be 1)
    "lokr_dense": lambda: peft.LoKrConfig(
        r=8, alpha=3, target_modules=["lin", "conv", "proj"], init_weights=False
    ),
    "lokr_patterns": lambda: peft.LoKrConfig(
        r=1, alpha=2, target_modules=TARGETS, rank_pattern={"lin": 8}, alpha_pattern={"conv": 7},
        init_weights=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_a_peft_loha_or_lokr_folder_merges_and_runs_as_peft_does(tmp_path, kind):
    folder, expected, merged = peft_folder(tmp_path, PEFT_CONFIGS[kind]())
    assert rel(outputs(net()), expected) > 1e-2  # the adapter changes the outputs
    adapter = load_adapter(folder)
    assert adapter.format == "peft"
    assert all(isinstance(f, LoHa if kind.startswith("loha") else LoKr) for _, f in adapter.items())
    base = save_state(net().state_dict(), tmp_path / "base.safetensors")
    merge_checkpoint(base, folder, tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    for key, value in merged.items():
        assert rel(ours[key], value) < 1e-6, key
    model = net()
    apply_adapter(model, folder)
    assert rel(outputs(model), expected) < 1e-6
    # the linear layer in float64 from the file's tensors and PEFT's scale, by the formulas
    scale = peft_loads(folder).base_model.model.lin.scaling["default"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    reference = net().lin.weight.double() + scale * _linear_delta64(tensors, "lin")
    assert rel(ours["lin.weight"].double(), reference) < 1e-6


def _linear_delta64(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """ΔW / scale of a linear layer's PEFT LoHa (`(w1a w1b) ⊙ (w2a w2b)`) or LoKr
    (`w1 ⊗ w2`, each dense or `a b`) in float64."""
    prefix = f"base_model.model.{module}."
    t = {k.removeprefix(prefix): v.double() for k, v in tensors.items() if k.startswith(prefix)}
    if "hada_w1_a" in t:
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return torch.kron(w1, w2)


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_peft_loads_our_loha_or_lokr_folder_to_the_same_outputs(tmp_path, kind):
    folder, expected, _ = peft_folder(tmp_path, PEFT_CONFIGS[kind]())
    save_adapter(load_adapter(folder, base=net()), tmp_path / "ours", "peft")
    assert rel(outputs(peft_loads(tmp_path / "ours")), expected) < 1e-6
    theirs = json.loads((folder / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    fields = ["peft_type", "r", "alpha", "rank_pattern", "alpha_pattern", "use_effective_conv2d"]
    if kind.startswith("lokr"):
        fields += ["decompose_both", "decompose_factor"]
    assert {k: ours[k] for k in fields} == {k: theirs[k] for k in fields}
    assert load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).keys() == load_file(
        str(folder / "adapter_model.safetensors")).keys()  # fmt: skip


def test_a_lokr_with_dense_parts_keeps_peft_s_scale_not_lycoris(tmp_path):
    """PEFT scales a LoKr whose w1 and w2 are dense by alpha / r (LyCORIS by 1): here 3/8."""
    folder, _, _ = peft_folder(tmp_path, PEFT_CONFIGS["lokr_dense"]())
    adapter = load_adapter(folder)
    assert all(f.rank is None and f.scale == 3 / 8 for _, f in adapter.items())
    with pytest.raises(errors.ConversionError, match="scale 1 in LyCORIS"):
        save_adapter(adapter, tmp_path / "l.safetensors", "lycoris")
    # inspect shows the config's alpha, which that scale is made of
    report = inspect_adapter(folder)
    assert [row["alpha"] for row in report["layers"]] == [3.0] * 3
    assert all(line.split()[3] == "3" for line in format_report(report).splitlines()[-3:])


def test_a_dense_lokr_combined_into_peft_keeps_its_factors_and_scale(tmp_path):
    """PEFT holds a dense LoKr's scale (alpha / r), so a folder combined into PEFT with
    weight 1 or 0.5 carries its bfloat16 w1 and w2 over as they are, the weight in the scale:
    PEFT merges the result to the weighted merge of the source (float64 reference), where
    splitting the scale 3/8 over w1 and w2, as LyCORIS files need, rounds them (about 2e-3)."""
    folder, _, _ = peft_folder(tmp_path, PEFT_CONFIGS["lokr_dense"]())
    weights = folder / "adapter_model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(str(weights)).items()}, str(weights))
    before = net().state_dict()
    source = peft_loads(folder).merge_and_unload().state_dict()
    for weight in (1.0, 0.5):
        report = combine_adapters([folder], tmp_path / f"w{weight}", [weight])
        assert [row["relative_error"] for row in report["layers"]] == [0.0] * 3
        merged = peft_loads(tmp_path / f"w{weight}").merge_and_unload().state_dict()
        for key in ("lin.weight", "conv.weight", "proj.weight"):
            delta = source[key].double() - before[key].double()
            assert rel(merged[key].double() - before[key].double(), weight * delta) < 1e-6, key


def test_factorization_splits_as_peft_does():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in range(1, 200):
        for factor in (-1, 0, 1, 2, 3, 4, 5, 8, 12, 16, 64, 150):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor)


# ---------------------------------------------------------------------------- LyCORIS → PEFT

LYCORIS_NETWORKS = [
    ("loha", {}),
    ("loha", {"use_tucker": True}),
    ("lokr", {}),
    ("lokr", {"use_tucker": True}),
    ("lokr", {"factor": 8, "decompose_both": True}),
    ("lokr", {"factor": 8, "decompose_both": True, "use_tucker": True}),
    ("lokr", {"full_matrix": True}),
]


@pytest.fixture
def lycoris(monkeypatch):
    """The lycoris package, with its class-level preset restored after the test."""
    module = pytest.importorskip("lycoris")
    for name in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "ENABLE_CONV"):
        monkeypatch.setattr(module.LycorisNetwork, name, getattr(module.LycorisNetwork, name))
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    return module


@pytest.mark.parametrize(("algo", "kwargs"), LYCORIS_NETWORKS)
def test_a_lycoris_file_becomes_a_peft_folder_peft_runs_as_lycoris_does(
    tmp_path, lycoris, algo, kwargs
):
    model = net2d()
    lycoris.LycorisNetwork.apply_preset({"target_name": ["lin", "conv", "proj"]})
    network = lycoris.create_lycoris(model, 1.0, linear_dim=2, linear_alpha=3, algo=algo,
                                     **kwargs)  # fmt: skip
    network.apply_to()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    expected = outputs(model)  # LyCORIS' own forward
    assert rel(outputs(net2d()), expected) > 1e-2
    convert_adapter(tmp_path / "l.safetensors", tmp_path / "peft", "peft", base=net2d())
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == algo.upper()
    assert config["use_effective_conv2d"] == bool(kwargs.get("use_tucker"))
    loaded = peft_loads(tmp_path / "peft", net2d)
    assert rel(outputs(loaded), expected) < 1e-6
    assert rel(outputs(loaded.merge_and_unload()), expected) < 1e-6


def test_a_lycoris_lokr_split_peft_cannot_make_is_refused_by_layer(tmp_path, lycoris):
    """LyCORIS splits 12 by factor 4 as 3·4, PEFT as 4·3 (it orders a split by a factor as
    (factor, rest)), and 48 as 4·12, which only factor 4 gives: no decompose_factor makes
    both, so the conversion is refused, naming a layer the default (-1) splits otherwise."""
    lycoris.LycorisNetwork.apply_preset({"target_name": ["conv", "wave"]})
    network = lycoris.create_lycoris(net(), 1.0, linear_dim=1, linear_alpha=1, algo="lokr",
                                     factor=4)  # fmt: skip
    network.apply_to()
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    with pytest.raises(errors.ConversionError, match=r"layer 'conv' splits out 48 = 4·12 .*"
                       "decompose_factor"):  # fmt: skip
        convert_adapter(tmp_path / "l.safetensors", tmp_path / "peft", "peft", base=net())
    assert not (tmp_path / "peft").exists()


def test_a_rank_still_converts_loha_to_peft_lora(tmp_path):
    folder, _, _ = peft_folder(tmp_path, PEFT_CONFIGS["loha"]())
    report = convert_adapter(folder, tmp_path / "lora", "peft", base=net(), rank=16)
    assert len(report["approximated"]) == 4
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


# ---------------------------------------------------------------------------- refusals


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("kind", "changes", "named"),
    [
        ("loha", {"r": 3}, "rank 3"),
        ("loha_effective_patterns", {"use_effective_conv2d": False}, "use_effective_conv2d"),
        ("lokr", {"decompose_factor": 2}, "decompose_factor=2"),
        ("lokr", {"decompose_factor": "4"}, "decompose_factor must be an integer"),
        ("lokr", {"decompose_both": "yes"}, "decompose_both must be true or false"),
        ("lokr_dense", {"r": 2}, "PEFT builds it factored"),
        ("lokr", {"target_modules": ["lin"]}, "target_modules"),
    ],
)
def test_peft_loha_lokr_configs_that_disagree_are_refused_by_field(tmp_path, kind, changes,
                                                                   named):  # fmt: skip
    folder, _, _ = peft_folder(tmp_path, PEFT_CONFIGS[kind]())
    _edit_config(folder, **changes)
    with pytest.raises(errors.FileFormatError, match=named):
        load_adapter(folder)


def test_a_peft_lokr_on_a_conv1d_with_a_dense_w2_is_refused(tmp_path):
    """PEFT runs such a layer as `torch.kron` of a 2-D `w1` and a 3-D `w2`, reshaped: no
    Kronecker product of these factors (PEFT's own merge differs from w1 ⊗ w2)."""
    config = peft.LoKrConfig(r=8, alpha=3, target_modules=["wave"], init_weights=False)
    folder, _, merged = peft_folder(tmp_path, config)
    w1 = load_file(str(folder / "adapter_model.safetensors"))["base_model.model.wave.lokr_w1"]
    w2 = load_file(str(folder / "adapter_model.safetensors"))["base_model.model.wave.lokr_w2"]
    kronecker = torch.kron(w1[:, :, None], w2) * 3 / 8
    assert rel(merged["wave.weight"] - net().wave.weight, kronecker) > 0.1
    with pytest.raises(errors.FileFormatError, match=r"'base_model\.model\.wave'.*Conv1d"):
        load_adapter(folder)
    with pytest.raises(errors.ConversionError, match=r"'wave'.*Conv1d"):
        save_adapter(Adapter({"wave": LoKr(w1, w2)}), tmp_path / "out", "peft")


def test_a_peft_loha_with_a_foreign_part_is_refused_by_key(tmp_path):
    folder, _, _ = peft_folder(tmp_path, PEFT_CONFIGS["loha"]())
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.lin.lokr_w1"] = torch.ones(2, 2)
    save_file(tensors, str(weights))
    with pytest.raises(errors.FileFormatError, match=r"'base_model\.model\.lin\.lokr_w1'.*LOHA"):
        load_adapter(folder)


def test_a_peft_loha_tucker_core_on_a_1x1_kernel_is_refused(tmp_path):
    """PEFT's use_effective_conv2d builds no core on a 1×1 convolution, so it would not load
    one there."""
    folder, _, _ = peft_folder(tmp_path, PEFT_CONFIGS["loha_effective_patterns"]())
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    for i in (1, 2):
        tensors[f"base_model.model.proj.hada_w{i}_a"] = _draw(4, 32, seed=i)
        tensors[f"base_model.model.proj.hada_t{i}"] = _draw(4, 4, 1, 1, seed=i + 2)
    save_file(tensors, str(weights))
    with pytest.raises(errors.FileFormatError, match=r"'base_model\.model\.proj'.*1×1 kernel"):
        load_adapter(folder)


def _half(out: int, inp: int, rank: int, seed: int) -> LoRA:
    return LoRA(_draw(rank, inp, seed=seed), _draw(out, rank, seed=seed + 1))


def test_what_peft_cannot_build_is_refused_when_written(tmp_path):
    loha = LoHa(_half(96, 64, 2, 1), _half(96, 64, 2, 3), 0.5)
    mixed = Adapter({"lin": loha, "proj": LoRA(_draw(2, 48, seed=5), _draw(32, 2, seed=6))})
    with pytest.raises(errors.ConversionError, match="one adapter type"):
        save_adapter(mixed, tmp_path / "a", "peft")
    # 96 = 2·48 and 64 = 8·8: no one decompose_factor splits both so
    odd = LoKr(_draw(2, 8, seed=1), _draw(48, 8, seed=2), 1.0)
    with pytest.raises(errors.ConversionError, match="decompose_factor"):
        save_adapter(Adapter({"lin": odd}), tmp_path / "b", "peft")
    # PEFT builds w2 (12, 8) dense at rank 4 (4 ≥ 12 / 2 fails: factored), not at rank 1
    small = LoKr(_draw(8, 8, seed=1), _half(12, 8, 1, 2), 1.0)
    assert save_adapter(Adapter({"lin": small}), tmp_path / "c", "peft")
    big = LoKr(_draw(8, 8, seed=1), _half(12, 8, 6, 2), 1.0)
    with pytest.raises(errors.ConversionError, match="w2 is factored, PEFT builds it dense"):
        save_adapter(Adapter({"lin": big}), tmp_path / "d", "peft")
    volume = LoHa(*(LoRA(_draw(2, 4, 3, 3, 3, seed=s), _draw(6, 2, 1, 1, 1, seed=s + 1))
                    for s in (1, 3)))  # fmt: skip
    with pytest.raises(errors.ConversionError, match="3-D kernel"):
        save_adapter(Adapter({"vol": volume}), tmp_path / "e", "peft")
    assert not any((tmp_path / n).exists() for n in "abde")


def test_the_adapter_type_is_the_first_loha_or_lokr_layer_s(tmp_path):
    """Whatever layer comes first (a LyCORIS file's `diff_b` is read before its module's
    factors), the folder's type is that of its LoHa / LoKr layers, and the refusal names the
    layer that set it; a bias's dense difference is refused as such, with no rank offered."""
    loha = LoHa(_half(96, 64, 2, 1), _half(96, 64, 2, 3), 0.5)
    plain = LoRA(_draw(2, 48, seed=5), _draw(32, 2, seed=6))
    with pytest.raises(errors.ConversionError, match="'proj' is a LoRA, but 'lin' makes this a "
                                                     "PEFT LOHA adapter"):  # fmt: skip
        save_adapter(Adapter({"proj": plain, "lin": loha}), tmp_path / "a", "peft")
    bias = Full(_draw(96, seed=7))
    with pytest.raises(errors.ConversionError, match=r"'lin\.bias' is a dense difference.*1-D"):
        save_adapter(Adapter({"lin.bias": bias, "lin": loha}), tmp_path / "b", "peft")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------- embeddings


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(20, 16)
        self.lin = nn.Linear(16, 8)

    def forward(self, ids):
        return self.lin(self.tok(ids))


def embedder() -> Embedder:
    torch.manual_seed(0)
    return Embedder()


IDS = torch.tensor([[1, 5, 7, 19, 0, 5]])


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


@pytest.fixture
def embedding_lora(tmp_path):
    """A PEFT LoRA on `tok` (rank 2 by `rank_pattern`, rsLoRA) and `lin`; its outputs and
    its `merge_and_unload` weights."""
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["tok", "lin"], use_rslora=True,
                             rank_pattern={"tok": 2}, init_lora_weights=False)  # fmt: skip
    torch.manual_seed(1)
    model = peft.get_peft_model(embedder(), config)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", run(model), model.merge_and_unload().state_dict()


def test_a_peft_lora_on_an_embedding_merges_and_runs_as_peft_does(tmp_path, embedding_lora):
    folder, expected, merged = embedding_lora
    assert rel(run(embedder()), expected) > 1e-2
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a = tensors["base_model.model.tok.lora_embedding_A"].double()  # (r, num_embeddings)
    b = tensors["base_model.model.tok.lora_embedding_B"].double()  # (embedding_dim, r)
    table = embedder().tok.weight.double() + 5 / 2**0.5 * (b @ a).T
    base = save_state(embedder().state_dict(), tmp_path / "base.safetensors")
    merge_checkpoint(base, folder, tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    assert rel(ours["tok.weight"].double(), table) < 1e-7
    for key, value in merged.items():
        assert rel(ours[key], value) < 1e-6, key
    for put in (apply_adapter, inject_adapter):
        model = embedder()
        put(model, folder)
        assert rel(run(model), expected) < 1e-6


def test_peft_loads_our_embedding_lora_to_the_same_outputs(tmp_path, embedding_lora):
    folder, expected, _ = embedding_lora
    adapter = load_adapter(folder)
    assert adapter.embeddings == ("tok.weight",)
    save_adapter(adapter, tmp_path / "ours", "peft")
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).keys()
    assert keys == load_file(str(folder / "adapter_model.safetensors")).keys()
    assert rel(run(peft.PeftModel.from_pretrained(embedder(), tmp_path / "ours")), expected) < 1e-6
    # through a kohya file, which holds no module types: the base model tells the table
    save_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    convert_adapter(tmp_path / "k.safetensors", tmp_path / "again", "peft", base=embedder())
    again = peft.PeftModel.from_pretrained(embedder(), tmp_path / "again")
    assert rel(run(again), expected) < 1e-6


@pytest.mark.parametrize("fmt", ["kohya", "lycoris"])
def test_a_table_of_no_known_name_goes_through_kohya_to_peft_without_a_base(
    tmp_path, embedding_lora, fmt
):
    """`tok` is no name a table has by convention: the kohya / LyCORIS file lowrank writes
    records it (metadata), so its PEFT output holds lora_embedding_A / _B, which PEFT loads
    (lora_A / lora_B there would load with no effect)."""
    folder, expected, _ = embedding_lora
    convert_adapter(folder, tmp_path / "k.safetensors", fmt)
    convert_adapter(tmp_path / "k.safetensors", tmp_path / "again", "peft")
    keys = load_file(str(tmp_path / "again" / "adapter_model.safetensors")).keys()
    assert keys == load_file(str(folder / "adapter_model.safetensors")).keys()
    again = peft.PeftModel.from_pretrained(embedder(), tmp_path / "again")
    assert rel(run(again), expected) < 1e-6


def test_resize_and_combine_keep_an_embedding_lora_peft_s(tmp_path, embedding_lora):
    folder, expected, _ = embedding_lora
    resize_adapter(folder, tmp_path / "resized", rank=3)  # the ranks it has: the same ΔW
    combine_adapters([folder, folder], tmp_path / "combined", weights=[0.25, 0.75])
    for out in ("resized", "combined"):
        keys = load_file(str(tmp_path / out / "adapter_model.safetensors")).keys()
        assert "base_model.model.tok.lora_embedding_A" in keys, out
        loaded = peft.PeftModel.from_pretrained(embedder(), tmp_path / out)
        assert rel(run(loaded), expected) < 1e-6, out


def test_an_embedding_lora_is_refused_for_diffusers_and_peft_loha(tmp_path, embedding_lora):
    folder, _, _ = embedding_lora
    with pytest.raises(errors.ConversionError, match=r"'tok'.*embedding table"):
        convert_adapter(folder, tmp_path / "d", "diffusers")
    with pytest.raises(errors.ConversionError, match=r"'tok'.*embedding table"):
        save_adapter(load_adapter(folder), tmp_path / "d2", "diffusers")
    loha = LoHa(_half(20, 16, 2, 1), _half(20, 16, 2, 3))
    with pytest.raises(errors.ConversionError, match="'tok' updates a weight as stored"):
        save_adapter(Adapter({"tok": loha}, embeddings=("tok.weight",)), tmp_path / "l", "peft")


def test_a_saved_table_that_differs_from_the_base_s_replaces_it_as_in_peft(
    tmp_path, embedding_lora
):
    """A table saved beside its LoRA (`tok.base_layer.weight`) that is not the base's: PEFT
    loads it in place of the base's, and so do lowrank's merge and apply; two adapters that
    save different tables for one module are refused, naming it, with nothing written."""
    folder, _, _ = embedding_lora
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.tok.base_layer.weight"] = _draw(20, 16, seed=8)
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file(tensors, str(other / "adapter_model.safetensors"))
    model = peft.PeftModel.from_pretrained(embedder(), other)
    expected = run(model)
    merged = model.merge_and_unload().state_dict()
    base = save_state(embedder().state_dict(), tmp_path / "base.safetensors")
    merge_checkpoint(base, other, tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    assert ours.keys() == merged.keys()
    for key, value in merged.items():
        assert rel(ours[key], value) < 1e-6, key
    applied = embedder()
    apply_adapter(applied, other)
    assert rel(run(applied), expected) < 1e-6
    tensors["base_model.model.tok.base_layer.weight"] = _draw(20, 16, seed=9)
    third = tmp_path / "third"
    third.mkdir()
    (third / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file(tensors, str(third / "adapter_model.safetensors"))
    with pytest.raises(errors.MergeError, match=r"tok\.weight"):
        merge_checkpoint(base, [other, third], tmp_path / "both.safetensors")
    with pytest.raises(errors.ConversionError, match=r"tok\.weight"):
        combine_adapters([other, third], tmp_path / "both")
    assert not (tmp_path / "both.safetensors").exists() and not (tmp_path / "both").exists()
    merge_checkpoint(base, [other, folder], tmp_path / "one.safetensors")  # one saved table


def test_a_module_with_both_kinds_of_lora_factors_is_refused(tmp_path, embedding_lora):
    folder, _, _ = embedding_lora
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.tok.lora_A.weight"] = torch.ones(2, 16)
    tensors["base_model.model.tok.lora_B.weight"] = torch.ones(20, 2)
    save_file(tensors, str(weights))
    with pytest.raises(errors.FileFormatError, match="'tok' has both lora_A"):
        load_adapter(folder)


def llama_config(vocab_size: int = 64):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip


def llama(seed: int = 0, vocab_size: int | None = None, path=None):
    """A tiny `LlamaForCausalLM` (loaded from `path` if given), its vocabulary resized to
    `vocab_size`, the new rows drawn from `seed` by the model's initialisation."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    if path is not None:  # PEFT then tells a resized vocabulary from the base's config.json
        model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    if vocab_size is not None:
        torch.manual_seed(seed)
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


LLAMA_IDS = torch.tensor([[3, 17, 60, 9]])


def test_a_lora_peft_ties_to_another_by_ensure_weight_tying_is_refused_by_name(tmp_path):
    """With `ensure_weight_tying` PEFT gives a tied LM head a LoRA it does not target, tied
    to the input embedding's (one update of their shared weight), and saves its factors:
    reading the folder is a `FileFormatError` naming the field, not one saying PEFT would
    skip the keys."""
    transformers = pytest.importorskip("transformers")
    config = llama_config()
    config.tie_word_embeddings = True
    lora = peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                           ensure_weight_tying=True, init_lora_weights=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
        model.save_pretrained(tmp_path / "peft")
    assert "base_model.model.lm_head.lora_A.weight" in load_file(
        str(tmp_path / "peft" / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(errors.FileFormatError, match=r"'lm_head'.*ensure_weight_tying"):
        load_adapter(tmp_path / "peft")
NEW_IDS = torch.tensor([[3, 66, 60, 69]])  # two tokens of a vocabulary resized to 70


def peft_llama(tmp_path, targets, name, vocab_size=None):
    """A PEFT LoRA on `targets` of `llama(1, vocab_size)` loaded from `tmp_path / "base"`,
    saved by PEFT as it saves by default (`save_embedding_layers="auto"`) at
    `tmp_path / name`."""
    lora = peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False)
    base = llama(1, vocab_size, tmp_path / "base")
    torch.manual_seed(1)
    model = peft.get_peft_model(base, lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / name)
    return tmp_path / name


def peft_run(folder, base, ids=LLAMA_IDS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits for `ids` and the `merge_and_unload` weights of PEFT's model of `folder` on
    `base`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(base, folder)
    with torch.no_grad():
        return model(ids).logits, model.merge_and_unload().state_dict()


def test_peft_s_saved_tables_are_loaded_as_peft_loads_them(tmp_path):
    """PEFT saves the tables of `embed_tokens` / `lm_head` beside their LoRAs by default
    (`….base_layer.weight`) and loads them in place of the base's: on the base they equal,
    merges and applied models are PEFT's, and they go into PEFT output, or, against that
    base, into kohya output, left out as changing nothing."""
    llama().save_pretrained(tmp_path / "base")
    folder = peft_llama(tmp_path, ["q_proj", "v_proj", "embed_tokens", "lm_head"], "peft")
    keys = load_file(str(folder / "adapter_model.safetensors")).keys()
    saved = {"base_model.model.model.embed_tokens.base_layer.weight",
             "base_model.model.lm_head.base_layer.weight"}  # fmt: skip
    assert saved <= keys
    report = inspect_adapter(folder)
    assert report["base_weights"] == {"lm_head.weight": [64, 16],
                                      "model.embed_tokens.weight": [64, 16]}  # fmt: skip
    assert "lm_head.weight 64×16" in format_report(report)
    assert inspect_adapter(folder, base=tmp_path / "base")["base_weights"] == {}  # the base's
    expected, merged = peft_run(folder, llama())
    merge_checkpoint(tmp_path / "base", folder, tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    assert ours.keys() == merged.keys()
    for key, value in merged.items():
        assert rel(ours[key], value) < 1e-6, key
    for put in (apply_adapter, inject_adapter):
        model = llama()
        put(model, folder)
        with torch.no_grad():
            assert rel(model(LLAMA_IDS).logits, expected) < 1e-5, put
    for out in ("converted", "resized", "combined"):  # the saved tables kept
        if out == "converted":
            convert_adapter(folder, tmp_path / out, "peft")
        elif out == "resized":
            resize_adapter(folder, tmp_path / out, rank=2)
        else:
            combine_adapters([folder, folder], tmp_path / out, weights=[0.5, 0.5])
        assert saved <= load_file(str(tmp_path / out / "adapter_model.safetensors")).keys()
        assert rel(peft_run(tmp_path / out, llama())[0], expected) < 1e-5, out
    with pytest.raises(errors.ConversionError, match=r"lm_head\.weight \(2 in all\).*whole base"):
        convert_adapter(folder, tmp_path / "k.safetensors", "kohya")
    assert not (tmp_path / "k.safetensors").exists()
    convert_adapter(folder, tmp_path / "k.safetensors", "kohya", base=tmp_path / "base")
    merge_checkpoint(tmp_path / "base", tmp_path / "k.safetensors", tmp_path / "k.merged")
    ours = load_file(str(tmp_path / "k.merged"))
    for key, value in merged.items():
        assert rel(ours[key], value) < 1e-6, key


@pytest.mark.parametrize("targets", [["q_proj", "embed_tokens", "lm_head"], ["q_proj"]])
def test_tables_of_a_resized_vocabulary_replace_the_base_s_as_in_peft(tmp_path, targets):
    """Trained on a vocabulary resized to 70 rows, PEFT saves the tables (`….base_layer.weight`
    of adapted ones, the whole `….weight` of others) and loads them into a base resized to
    70 rows in place of its own new rows (drawn otherwise here): lowrank merges and applies
    them so; into a base of the old 64 rows neither loads them."""
    llama(2, 70).save_pretrained(tmp_path / "resized")
    llama().save_pretrained(tmp_path / "base")
    folder = peft_llama(tmp_path, targets, "peft", vocab_size=70)
    wrapped = "base_layer." if "lm_head" in targets else ""
    assert f"base_model.model.lm_head.{wrapped}weight" in load_file(
        str(folder / "adapter_model.safetensors"))  # fmt: skip
    expected, merged = peft_run(folder, llama(2, 70), NEW_IDS)
    assert rel(peft_run(folder, llama(3, 70), NEW_IDS)[0], expected) < 1e-6  # the file's rows
    table = llama(1, 70).model.embed_tokens.weight
    assert rel(llama(2, 70).model.embed_tokens.weight[64:], table[64:]) > 1e-2
    merge_checkpoint(tmp_path / "resized", folder, tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    for key, value in merged.items():
        assert rel(ours[key], value) < 1e-6, key
    for put in (apply_adapter, inject_adapter):
        model = llama(2, 70)
        put(model, folder)
        with torch.no_grad():
            assert rel(model(NEW_IDS).logits, expected) < 1e-5, put
    # the ΔW of an adapted table, or the saved table itself, does not fit
    why = r"'lm_head': ΔW has shape" if "lm_head" in targets else r"lm_head\.weight.*resize"
    with pytest.raises(errors.ShapeError, match=why):
        merge_checkpoint(tmp_path / "base", folder, tmp_path / "old.safetensors")
    assert not (tmp_path / "old.safetensors").exists()


def bert(num_labels: int = 3):
    """A tiny `BertForSequenceClassification` (its head `classifier`, biases everywhere)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=24,
                                     max_position_embeddings=16, num_labels=num_labels)  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


BERT_IDS = torch.tensor([[3, 17, 40, 9, 22], [5, 1, 8, 33, 2]])


def peft_classifier(tmp_path, name, bias="none", seed=1):
    """PEFT's LoRA (task_type SEQ_CLS, so `classifier` in `modules_to_save`) on query and
    value of `bert()` with `bias`, every trained tensor moved as by training except the
    head's bias (left equal to the base's), saved by PEFT at `tmp_path / name`."""
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=3, bias=bias,
                           target_modules=["query", "value"])  # fmt: skip
    model = peft.get_peft_model(bert(), lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if param.requires_grad and not key.endswith("modules_to_save.default.bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def peft_bert(folder, base=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits for `BERT_IDS` and the `merge_and_unload` weights of PEFT's model of
    `folder` on `base` (default `bert()`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(bert() if base is None else base, folder)
    with torch.no_grad():
        return model(BERT_IDS).logits, model.merge_and_unload().state_dict()


def bert_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(BERT_IDS).logits


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_peft_s_classification_head_and_trained_biases_load_as_in_peft(tmp_path, bias):
    """PEFT saves the trained copy of a `modules_to_save` module (the head it adds for
    SEQ_CLS) as `<module>.weight` / `.bias`, and with `bias="all"` / `"lora_only"` the
    biases (`….base_layer.bias` of adapted modules; with "all" also the copy's and the
    original's inside the head's wrapper, which PEFT's load puts in no module it runs). It
    loads them in place of the base's: lowrank's merge equals `merge_and_unload`, applied
    and injected models give PEFT's logits; PEFT output keeps them (the head whole, even
    against a base whose head bias is equal: PEFT loads the head only whole) and loads in
    PEFT to the same logits; kohya output is refused by name, with nothing written."""
    bert().save_pretrained(tmp_path / "base")
    folder = peft_classifier(tmp_path, "peft", bias)
    keys = load_file(str(folder / "adapter_model.safetensors")).keys()
    wrapped = "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias"
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert (wrapped in keys) == (bias != "none")
    assert ("base_model.model.classifier.original_module.bias" in keys) == (bias == "all")
    saved = inspect_adapter(folder)["base_weights"]
    assert saved["classifier.weight"] == [3, 16]
    assert ("bert.encoder.layer.0.attention.self.query.bias" in saved) == (bias != "none")
    assert ("bert.pooler.dense.bias" in saved) == (bias == "all")
    expected, merged = peft_bert(folder)
    assert rel(expected, bert_logits(bert())) > 1e-2
    merge_checkpoint(tmp_path / "base", folder, tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    assert ours.keys() == merged.keys()
    for key, value in merged.items():
        assert rel(ours[key], value) < 1e-6 or torch.equal(ours[key], value), key
    for put in (apply_adapter, inject_adapter):
        model = bert()
        put(model, folder)
        assert rel(bert_logits(model), expected) < 1e-5, put
    for out, base in (("converted", None), ("against_base", tmp_path / "base")):
        convert_adapter(folder, tmp_path / out, "peft", base=base)
        config = json.loads((tmp_path / out / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["classifier", "score"] and config["bias"] == bias
        assert rel(peft_bert(tmp_path / out)[0], expected) < 1e-5, out
    combine_adapters([folder, folder], tmp_path / "combined", weights=[0.5, 0.5])
    assert rel(peft_bert(tmp_path / "combined")[0], expected) < 1e-5
    with pytest.raises(errors.ConversionError, match=r"\.(weight|bias) \(\d+ in all\) is a whole"):
        convert_adapter(folder, tmp_path / "k.safetensors", "kohya", base=tmp_path / "base")
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("kind", ["LoHaConfig", "LoKrConfig"])
def test_peft_loha_lokr_classifiers_load_their_heads_as_in_peft(tmp_path, kind):
    """PEFT's LoHa / LoKr with task_type SEQ_CLS put the head in `modules_to_save` and save
    its trained copy (`classifier.weight` / `.bias`), as its LoRA does: lowrank applies it
    to PEFT's logits and writes it back to a folder PEFT loads to them; a config naming a
    module the file saves no tensors of is a `FileFormatError` against the base."""
    config = getattr(peft, kind)(task_type="SEQ_CLS", r=2, target_modules=["query", "value"],
                                 init_weights=False)  # fmt: skip
    model = peft.get_peft_model(bert(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "peft")
    expected, _ = peft_bert(tmp_path / "peft")
    assert rel(expected, bert_logits(bert())) > 1e-2
    applied = bert()
    apply_adapter(applied, tmp_path / "peft")
    assert rel(bert_logits(applied), expected) < 1e-5
    convert_adapter(tmp_path / "peft", tmp_path / "out", "peft")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["classifier", "score"]
    assert rel(peft_bert(tmp_path / "out")[0], expected) < 1e-5
    _edit_config(tmp_path / "peft", modules_to_save=["pooler"])
    untouched = bert()
    with pytest.raises(errors.FileFormatError, match="pooler"):
        apply_adapter(untouched, tmp_path / "peft")
    assert torch.equal(bert_logits(untouched), bert_logits(bert()))


def test_bad_saved_heads_and_biases_are_refused_by_name(tmp_path):
    """A saved head of another shape than the base's (PEFT: a size mismatch) is a
    `ShapeError`; a saved bias of no module of the base a `TargetError`; a head the config's
    `modules_to_save` names missing a tensor (PEFT's load fails on it) a `FileFormatError`;
    two adapters saving different heads a `MergeError` / `ConversionError`: each naming the
    key, with nothing written and the model unchanged."""
    bert().save_pretrained(tmp_path / "base")
    folder = peft_classifier(tmp_path, "peft", "lora_only")
    with pytest.raises(errors.ShapeError, match=r"classifier\.(weight|bias) is a whole base"):
        apply_adapter(bert(num_labels=2), folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    config = (folder / "adapter_config.json").read_text()

    def variant(name, changed):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(config)
        save_file(changed, str(tmp_path / name / "adapter_model.safetensors"))
        return tmp_path / name

    stray = variant("stray", {**tensors, "base_model.model.bert.nowhere.bias": torch.ones(16)})
    lacking = variant("lacking", {k: v for k, v in tensors.items()
                                  if k != "base_model.model.classifier.bias"})  # fmt: skip
    with pytest.raises(KeyError, match=r"classifier\.bias"):  # PEFT fails on it too
        peft_bert(lacking)
    model, before = bert(), bert_logits(bert())
    refusals = ((stray, errors.TargetError, r"bert\.nowhere\.bias"),
                (lacking, errors.FileFormatError, r"classifier\.bias of it"))  # fmt: skip
    for source, error, named in refusals:
        with pytest.raises(error, match=named):
            merge_checkpoint(tmp_path / "base", source, tmp_path / "m.safetensors")
        with pytest.raises(error, match=named):
            apply_adapter(model, source)
        assert torch.equal(bert_logits(model), before)
    other = peft_classifier(tmp_path, "other", "none", seed=2)  # a head of its own
    with pytest.raises(errors.MergeError, match=r"classifier\.weight"):
        merge_checkpoint(tmp_path / "base", [folder, other], tmp_path / "m.safetensors")
    with pytest.raises(errors.ConversionError, match=r"classifier\.weight"):
        combine_adapters([folder, other], tmp_path / "both")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "both").exists()


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_a_classifier_config_without_modules_to_save_reads_the_head_peft_adds(tmp_path, task):
    """PEFT adds `classifier` / `score` to `modules_to_save` by itself for a SEQ_CLS or
    TOKEN_CLS task, so a config saying `modules_to_save: null` loads the saved head whole
    (its bias too, though equal to the base's): lowrank's apply and merge give PEFT's
    logits and weights, and PEFT output against the base keeps the whole head and states it
    (`modules_to_save` ["classifier", "score"]), loading in PEFT to the same logits. A file
    without the head (or half of it) fails to load in PEFT (KeyError) and is a
    `FileFormatError` naming the missing tensor, with the model unchanged."""
    bert().save_pretrained(tmp_path / "base")
    folder = peft_classifier(tmp_path, "peft")  # the head's bias equal to the base's
    _edit_config(folder, modules_to_save=None, task_type=task)
    expected, merged = peft_bert(folder)
    assert rel(expected, bert_logits(bert())) > 1e-2
    applied = bert()
    apply_adapter(applied, folder)
    assert rel(bert_logits(applied), expected) < 1e-5
    merge_checkpoint(tmp_path / "base", folder, tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    for key, value in merged.items():
        assert rel(ours[key], value) < 1e-6 or torch.equal(ours[key], value), key
    convert_adapter(folder, tmp_path / "out", "peft", base=tmp_path / "base")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier", "score"]
    assert "base_model.model.classifier.bias" in load_file(
        str(tmp_path / "out" / "adapter_model.safetensors"))  # fmt: skip
    assert rel(peft_bert(tmp_path / "out")[0], expected) < 1e-5
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for name, dropped in (("headless", "classifier."), ("half", "classifier.bias")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(
            (folder / "adapter_config.json").read_text())  # fmt: skip
        save_file({k: v for k, v in tensors.items() if dropped not in k},
                  str(tmp_path / name / "adapter_model.safetensors"))  # fmt: skip
        with pytest.raises(KeyError, match="classifier"):
            peft_bert(tmp_path / name)
        model = bert()
        with pytest.raises(errors.FileFormatError, match=r"classifier\.(weight|bias) of it"):
            apply_adapter(model, tmp_path / name)
        assert torch.equal(bert_logits(model), bert_logits(bert()))
        with pytest.raises(errors.FileFormatError, match=r"task_type '.*_CLS'"):
            merge_checkpoint(tmp_path / "base", tmp_path / name, tmp_path / "m.safetensors")
        assert not (tmp_path / "m.safetensors").exists()


def test_a_lora_factor_inside_a_head_peft_trains_whole_is_refused(tmp_path):
    """PEFT gives no LoRA layer to a module in `modules_to_save`, or to a SEQ_CLS head it adds
    there, and skips such a module's LoRA keys when it loads the file (its logits are those
    without them): reading one is a `FileFormatError` naming the module and the field;
    writing a PEFT folder that would put a LoRA there is a `ConversionError`."""
    folder = peft_classifier(tmp_path, "peft")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(3)
    extra = {"base_model.model.classifier.lora_A.weight": torch.randn(2, 16, generator=g),
             "base_model.model.classifier.lora_B.weight": torch.randn(3, 2, generator=g)}
    save_file({**tensors, **extra}, str(folder / "adapter_model.safetensors"))
    _edit_config(folder, target_modules=["query", "value", "classifier"])
    with_lora, _ = peft_bert(folder)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    assert torch.equal(with_lora, peft_bert(folder)[0])  # PEFT skipped the keys
    save_file({**tensors, **extra}, str(folder / "adapter_model.safetensors"))
    for task, saved in (("SEQ_CLS", None), (None, ["classifier"])):
        _edit_config(folder, task_type=task, modules_to_save=saved)
        with pytest.raises(errors.FileFormatError, match=r"'classifier'.*modules_to_save"):
            load_adapter(folder)
    plain = Adapter({"classifier": LoRA(extra["base_model.model.classifier.lora_A.weight"],
                                        extra["base_model.model.classifier.lora_B.weight"])},
                    model={"task_type": "SEQ_CLS"})  # fmt: skip
    with pytest.raises(errors.ConversionError, match=r"'classifier'.*loads whole"):
        save_adapter(plain, tmp_path / "out", "peft")
    assert not (tmp_path / "out").exists()


def peft_plain_bert(tmp_path, name, targets, seed):
    """PEFT's LoRA on `targets` of `bert()` with no task type (no head saved), factors drawn
    at random, saved by PEFT at `tmp_path / name`."""
    model = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_a_combination_keeps_the_modules_peft_loads_whole(tmp_path):
    """Combining a SEQ_CLS classifier (its head in `modules_to_save`, `bias="lora_only"`) with
    a plain LoRA (no task, `bias="none"`): the output config keeps `modules_to_save`,
    `task_type` and the widest `bias`, and the saved head and biases, so PEFT loads it as a
    classifier: its logits are those of the weighted sum of PEFT's own merges, and with the
    adapter disabled its head is the base's (PEFT keeps the base head apart only for a module
    it saves whole). A plain LoRA on the head itself, which PEFT would skip under `modules_to_save`,
    is a `ConversionError` naming it, with nothing written."""
    first = peft_classifier(tmp_path, "first", "lora_only")
    second = peft_plain_bert(tmp_path, "second", ["key"], 2)
    combine_adapters([first, second], tmp_path / "both", weights=[1.0, 0.5])
    config = json.loads((tmp_path / "both" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier", "score"]
    assert (config["task_type"], config["bias"]) == ("SEQ_CLS", "lora_only")
    _, merged_first = peft_bert(first)
    _, merged_second = peft_bert(second)
    base = bert().state_dict()
    summed = {key: value + (merged_first[key] - value) + 0.5 * (merged_second[key] - value)
              for key, value in base.items()}  # fmt: skip
    reference = bert()
    reference.load_state_dict(summed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(bert(), tmp_path / "both")
    assert isinstance(loaded, peft.PeftModelForSequenceClassification)
    assert rel(bert_logits(loaded), bert_logits(reference)) < 1e-5
    hidden = torch.randn(2, 16)
    with loaded.disable_adapter(), torch.no_grad():
        assert torch.equal(loaded.base_model.model.classifier(hidden), bert().classifier(hidden))
    on_head = peft_plain_bert(tmp_path, "on_head", ["key", "classifier"], 3)
    with pytest.raises(errors.ConversionError, match=r"'classifier'.*loads whole"):
        combine_adapters([first, on_head], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


class Tower(nn.Module):
    """A linear layer, a LayerNorm and a head of two linear layers, biases everywhere."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.lin(x)))


@pytest.mark.parametrize(
    "settings",
    [{"bias": "all"}, {"bias": "lora_only", "modules_to_save": ["norm", "head"]}],
    ids=["all", "lora_only+modules_to_save"],
)
def test_trained_biases_and_saved_modules_of_any_model_load_as_in_peft(tmp_path, settings):
    """Without a task type: `bias="all"` saves every bias (the LayerNorm's too),
    `modules_to_save` a LayerNorm's weight and bias and a head of two layers whole
    (`head.0.weight`, …); lowrank's merge of a checkpoint and applied model are PEFT's
    `merge_and_unload`, and its PEFT output loads in PEFT to the same outputs."""
    lora = peft.LoraConfig(r=2, target_modules=["lin"], **settings)
    model = peft.get_peft_model(Tower(), lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "peft")
    saved = inspect_adapter(tmp_path / "peft")["base_weights"]
    assert {"lin.bias", "norm.bias", "head.1.bias"} <= saved.keys()
    assert ("head.1.weight" in saved) == ("modules_to_save" in settings)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        merged = model.merge_and_unload().state_dict()
    base = save_state(Tower().state_dict(), tmp_path / "base.safetensors")
    merge_checkpoint(base, tmp_path / "peft", tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    applied = Tower()
    apply_adapter(applied, tmp_path / "peft")
    for key, value in merged.items():
        assert rel(ours[key], value) < 1e-6 and rel(applied.state_dict()[key], value) < 1e-6, key
    convert_adapter(tmp_path / "peft", tmp_path / "converted", "peft")
    loaded = peft.PeftModel.from_pretrained(Tower(), tmp_path / "converted")
    with torch.no_grad():
        assert rel(loaded(x), expected) < 1e-6
@pytest.mark.parametrize("kind", ["LoHa", "LoKr"])
def test_peft_loha_and_lokr_s_saved_tables_are_loaded_as_peft_loads_them(tmp_path, kind):
    """PEFT saves `lm_head.base_layer.weight` beside a LoHa / LoKr on `lm_head` by default
    (`save_embedding_layers="auto"`), as beside a LoRA: with that table and a whole
    `embed_tokens.weight` unlike the base's, lowrank's merge and applied model are PEFT's,
    and its PEFT output keeps both and loads in PEFT to the same logits."""
    llama().save_pretrained(tmp_path / "base")
    config = getattr(peft, f"{kind}Config")(r=2, alpha=3, target_modules=["q_proj", "lm_head"],
                                             init_weights=False)  # fmt: skip
    torch.manual_seed(1)
    model = peft.get_peft_model(llama(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    saved = {"base_model.model.lm_head.base_layer.weight",
             "base_model.model.model.embed_tokens.weight"}  # fmt: skip
    for seed, key in enumerate(sorted(saved)):  # tables PEFT loads in place of the base's
        tensors[key] = _draw(64, 16, seed=seed)
    save_file(tensors, str(weights))
    expected, merged = peft_run(tmp_path / "peft", llama())
    assert rel(merged["model.embed_tokens.weight"], llama().model.embed_tokens.weight) > 0.5
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    for key, value in merged.items():
        assert rel(ours[key], value) < 1e-6, key
    applied = llama()
    apply_adapter(applied, tmp_path / "peft")
    with torch.no_grad():
        assert rel(applied(LLAMA_IDS).logits, expected) < 1e-5
    convert_adapter(tmp_path / "peft", tmp_path / "again", "peft")
    assert saved <= load_file(str(tmp_path / "again" / "adapter_model.safetensors")).keys()
    assert rel(peft_run(tmp_path / "again", llama())[0], expected) < 1e-6


def test_a_tiny_llama_s_token_table_lora_goes_through_kohya_and_back_to_peft(tmp_path):
    """A transformers model saved with its `config.json`: lowrank merges PEFT's LoRA on
    `embed_tokens` (an `nn.Embedding`, found by type from the config) as PEFT does, and a
    kohya file of it converts back to a PEFT folder that gives PEFT's logits."""
    transformers = pytest.importorskip("transformers")
    config = llama_config()

    def llama():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()

    llama().save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["embed_tokens", "q_proj"],
                           init_lora_weights=False)  # fmt: skip
    torch.manual_seed(1)
    model = peft.get_peft_model(llama(), lora)
    model.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    ids = torch.tensor([[3, 17, 60, 9]])
    with torch.no_grad():
        expected = model(ids).logits
        merged = model.merge_and_unload().state_dict()
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "merged.safetensors")
    ours = load_file(str(tmp_path / "merged.safetensors"))
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert rel(ours[key], merged[key]) < 1e-6, key
    assert not torch.equal(ours["model.embed_tokens.weight"], llama().model.embed_tokens.weight)
    convert_adapter(tmp_path / "peft", tmp_path / "k.safetensors", "kohya")
    convert_adapter(tmp_path / "k.safetensors", tmp_path / "again", "peft", base=tmp_path / "base")
    keys = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    with torch.no_grad():
        logits = peft.PeftModel.from_pretrained(llama(), tmp_path / "again")(ids).logits
    assert rel(logits, expected) < 1e-5
