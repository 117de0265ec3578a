"""Seeded random chains of the adapter tools against the real PEFT: a PEFT adapter (LoRA,
DoRA, LoHa or LoKr; rank and alpha patterns, rsLoRA; float32, bfloat16 or float16 tensors) on
a tiny Llama or GPT-2 goes through convert / resize (to a rank it already meets) / combine
(weight 1, or beside the source at weight 0) into random formats; whatever each step writes
merges (`merge_checkpoint`, `apply_adapter`) and, back in PEFT, loads to PEFT's merge of the
source (float64 ΔW, relative 1e-5, plus what a combination reports: LyCORIS files hold a
dense LoKr at scale 1, so its scale is split into its factors there). A step may refuse with
a `LowRankError` (a layer its format cannot hold exactly), and then leaves every file as it
was and writes nothing."""

from __future__ import annotations

import hashlib
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank import errors
from lowrank.io import (
    apply_adapter,
    combine_adapters,
    convert_adapter,
    merge_checkpoint,
    resize_adapter,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

FORMATS = ("peft", "kohya", "lycoris", "diffusers")
TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}  # fmt: skip


def model(kind: str):
    """A tiny transformers model of `kind`, its weights drawn from N(0, 0.3²)."""
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
        built = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2,
                                         n_positions=16)  # fmt: skip
        built = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for parameter in built.parameters():
            parameter.normal_(0, 0.3)
    return built


def peft_config(rng: random.Random, kind: str):
    """A random PEFT config for `kind`: the adapter type, ranks, alphas and their patterns."""
    targets = rng.sample(TARGETS[kind], rng.randint(1, len(TARGETS[kind])))
    r, alpha = rng.choice([1, 2, 3, 5]), rng.choice([1, 3.5, 8])
    ranks = {t: rng.randint(1, 6) for t in targets if rng.random() < 0.3}
    alphas = {t: rng.choice([2, 7]) for t in targets if rng.random() < 0.3}
    kinds = ["lora", "dora"] + (["loha", "lokr"] if kind == "llama" else [])
    adapter = rng.choice(kinds)
    if adapter in ("lora", "dora"):
        return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, rank_pattern=ranks,
                               alpha_pattern=alphas, use_rslora=rng.random() < 0.4,
                               use_dora=adapter == "dora", fan_in_fan_out=kind == "gpt2",
                               init_lora_weights=False)  # fmt: skip
    config = peft.LoHaConfig if adapter == "loha" else peft.LoKrConfig
    return config(r=r, alpha=alpha, target_modules=targets, rank_pattern=ranks,
                  alpha_pattern=alphas, init_weights=False)  # fmt: skip


def deltas(state: dict, base: dict) -> dict[str, torch.Tensor]:
    """`state − base` in float64, for the floating tensors `state` holds."""
    return {k: state[k].double() - base[k].double()
            for k in base if k in state and base[k].is_floating_point()}  # fmt: skip


def assert_merges_to(got: dict, want: dict, what: str, reported: float) -> None:
    """`got` ΔW equals `want`'s to 1e-5 plus twice the errors the chain `reported` (a key
    `got` lacks, as a checkpoint lacks GPT-2's tied `lm_head.weight`, unchanged in `want`)."""
    for key, delta in want.items():
        if key not in got:
            assert not delta.any(), (what, key)
            continue
        error = float((got[key] - delta).norm()) / max(float(delta.norm()), 1e-12)
        small = float((got[key] - delta).abs().max()) < 1e-6
        assert error < 1e-5 + 2 * reported or small, (what, key, error, reported)


def digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def run_chain(seed: int, folder: Path) -> None:
    rng = random.Random(seed)
    kind = rng.choice(["llama", "gpt2"])
    base_model = model(kind)
    base_model.save_pretrained(folder / "base")
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(base_model, peft_config(rng, kind))
    with torch.no_grad():  # DoRA magnitudes other than the norms PEFT starts them at
        for name, parameter in peft_model.named_parameters():
            if "lora_magnitude" in name:
                parameter.mul_(1 + 0.1 * torch.randn_like(parameter))
    source = folder / "source"
    peft_model.save_pretrained(source)
    dtype = rng.choice([None, torch.bfloat16, torch.float16])
    if dtype is not None:
        weights = source / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(str(weights)).items()}, str(weights))

    def peft_merge(path: Path) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(model(kind), path)
        return deltas(loaded.merge_and_unload().state_dict(), base)

    want = peft_merge(source)
    current, fmt = source, "peft"
    reported = 0.0  # the errors combine reports where it splits a dense LoKr's scale
    for step in range(rng.randint(1, 3)):
        to, tool = rng.choice(FORMATS), rng.choice(["convert", "resize", "combine", "combine0"])
        out = folder / (f"step{step}" + ("" if to == "peft" else ".safetensors"))
        before = digest(folder)
        try:
            if tool == "convert":
                convert_adapter(current, out, to, base=folder / "base")
            elif tool == "resize":  # every layer is at or below rank 64: copied as it is
                resize_adapter(current, out, 64, format=to, base=folder / "base")
            else:
                pairs = [(current, 1.0)] + ([(source, 0.0)] if tool == "combine0" else [])
                inputs, weights = [p for p, _ in pairs], [w for _, w in pairs]
                report = combine_adapters(inputs, out, weights, format=to, base=folder / "base")
                if to == "lycoris":  # which holds a dense LoKr at scale 1
                    reported += max(row["relative_error"] for row in report["layers"])
        except errors.LowRankError:
            assert digest(folder) == before, (tool, to)
            continue
        assert {k: v for k, v in digest(folder).items() if k in before} == before, (tool, to)
        current, fmt = out, to
    merged = folder / "merged.safetensors"
    try:
        merge_checkpoint(folder / "base", current, merged)
    except errors.LowRankError:
        return
    assert_merges_to(deltas(load_file(str(merged)), base), want, "merge_checkpoint", reported)
    applied = model(kind)
    apply_adapter(applied, current)
    assert_merges_to(deltas(applied.state_dict(), base), want, "apply_adapter", reported)
    back = current
    if fmt != "peft":
        back = folder / "back"
        try:
            convert_adapter(current, back, "peft", base=folder / "base")
        except errors.LowRankError:
            return
    assert_merges_to(peft_merge(back), want, "PEFT", reported)


@pytest.mark.parametrize("seed", [21, 85])  # a dense LoKr combined into PEFT, among others
def test_a_random_chain_of_tools_merges_as_peft_merges_the_source(tmp_path, seed):
    run_chain(seed, tmp_path)


@pytest.mark.exhaustive
@pytest.mark.parametrize("seed", range(200))
def test_random_chains_of_tools_merge_as_peft_merges_the_source(tmp_path, seed):
    run_chain(seed, tmp_path)
