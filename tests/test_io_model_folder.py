"""A merge into a model folder gives a model folder: the merged checkpoint with the base
folder's other files (config.json, tokenizer, …) beside it, config.json changed where the
merge changes what it describes, so that transformers loads the output as it loads the base.
References: transformers' own loading of the output, PEFT's merge, float64 sums."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank.errors import FileFormatError, OutputPathError
from lowrank.io import merge_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _llama(tmp_path, shard: str | None = None):
    """A tiny Llama saved by transformers (sharded where `shard` gives a size), a PEFT
    LoRA on its q/v projections and the model PEFT merges it into."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size=shard or "1GB")
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (base / "pytorch_model.bin.index.json").write_text("{}")  # weights of another format
    (base / ".cache").mkdir()
    (base / "original").mkdir()
    (base / "original" / "params.json").write_text("{}")
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    lora.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter", lora.merge_and_unload()


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_a_merged_model_folder_loads_with_transformers_as_peft_merges_it(tmp_path, shard):
    base, adapter, merged = _llama(tmp_path, shard)
    assert (base / "model.safetensors.index.json").exists() == (shard is not None)
    out = tmp_path / "merged"
    report = merge_checkpoint(base, adapter, f"{out}/")
    copied = sorted(p.rsplit("/", 1)[-1] for p in report["copied_files"])
    assert copied == ["config.json", "generation_config.json", "tokenizer_config.json"]
    for name in copied:  # byte for byte: nothing asked for a change
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert not (out / "original").exists() and not (out / "pytorch_model.bin.index.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        expected, got = merged(ids).logits, loaded(ids).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dtype_is_stated_in_the_copied_config(tmp_path):
    base, adapter, _ = _llama(tmp_path)
    before = json.loads((base / "config.json").read_text())
    report = merge_checkpoint(base, adapter, f"{tmp_path / 'merged'}/", dtype="bfloat16")
    assert report["rewritten_files"] == [str(tmp_path / "merged" / "config.json")]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    dtype_key = "dtype" if "dtype" in before else "torch_dtype"
    assert config == {**before, dtype_key: "bfloat16"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def _e4m3(values: torch.Tensor) -> torch.Tensor:
    """`values` rounded to the nearest float8_e4m3fn (ties to even), from the table of all
    its finite values, not through torch's cast."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    table = codes.to(torch.float64)
    keep = ~torch.isnan(table)
    table, codes = table[keep], codes[keep]
    order = torch.argsort(table)
    table, codes = table[order], codes[order]
    index = torch.searchsorted(table, values.reshape(-1)).clamp(1, len(table) - 1)
    low, high = table[index - 1], table[index]
    pick_high = (values.reshape(-1) - low > high - values.reshape(-1)) | (
        (values.reshape(-1) - low == high - values.reshape(-1))
        & (codes[index].view(torch.uint8) % 2 == 0)
    )
    return torch.where(pick_high, codes[index].view(torch.uint8), codes[index - 1].view(
        torch.uint8)).view(torch.float8_e4m3fn).reshape(values.shape)


def test_a_dequantizing_merge_of_an_fp8_folder_loads_as_a_plain_model(tmp_path):
    """transformers' fine-grained FP8 layout (`weight_scale_inv` per 16×16 block here,
    `quantization_config.quant_method: fp8`): with `dtype`, the output's config.json has no
    quantization_config, and transformers loads the bfloat16 weights, `W8 · s + ΔW`, as a
    plain model (the base's config would make it build FP8 layers and look for scales)."""
    base, adapter, _ = _llama(tmp_path)
    state = load_file(str(base / "model.safetensors"))
    block, exact = 16, {}
    for key in list(state):
        if key.endswith("_proj.weight"):
            weight = state[key].double()
            rows, cols = weight.shape
            peaks = weight.abs().reshape(rows // block, block, cols // block, block).amax((1, 3))
            scale = (peaks / 448).float()
            full = scale.double().repeat_interleave(block, 0).repeat_interleave(block, 1)
            state[key] = _e4m3(weight / full)
            state[key.replace(".weight", ".weight_scale_inv")] = scale
            exact[key] = state[key].double() * full
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    save_file(state, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block]}
    (fp8 / "config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    report = merge_checkpoint(fp8, adapter, f"{out}/", dtype="bfloat16")
    assert report["rewritten_files"] == [str(out / "config.json")]
    written = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in written
    assert written == {
        **{k: v for k, v in config.items() if k != "quantization_config"},
        "dtype" if "dtype" in config else "torch_dtype": "bfloat16",
    }
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    weights = dict(loaded.named_parameters())
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for key, value in exact.items():
        module = key.removesuffix(".weight")
        a = lora.get(f"base_model.model.{module}.lora_A.weight")
        if a is not None:
            b = lora[f"base_model.model.{module}.lora_B.weight"]
            value = value + 2.0 * b.double() @ a.double()
        got = weights[key].double()
        assert got.dtype == torch.float64 and weights[key].dtype == torch.bfloat16
        assert torch.equal(got, value.to(torch.bfloat16).double()) or (
            (got - value).abs().max() <= value.abs().max() * 2**-8
        )


def test_a_file_base_or_a_file_output_copies_nothing(tmp_path):
    base, adapter, _ = _llama(tmp_path)
    report = merge_checkpoint(base, adapter, tmp_path / "merged.safetensors")
    assert report["copied_files"] == [] and report["output"] == [
        str(tmp_path / "merged.safetensors")
    ]
    (tmp_path / "into").mkdir()  # an existing folder: the file under its own name in it
    report = merge_checkpoint(base / "model.safetensors", adapter, tmp_path / "into")
    assert report["output"] == [str(tmp_path / "into" / "model.safetensors")]
    assert report["copied_files"] == [] and sorted(p.name for p in (tmp_path / "into").iterdir()) \
        == ["model.safetensors"]


def test_a_failed_merge_into_a_folder_leaves_nothing(tmp_path):
    base, adapter, _ = _llama(tmp_path)
    (base / "config.json").write_text("{not json")
    with pytest.raises(FileFormatError, match=r"config\.json is not valid JSON"):
        merge_checkpoint(base, adapter, f"{tmp_path / 'merged'}/", dtype="float16")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(OutputPathError, match="is the folder of the checkpoint"):  # the base's
        merge_checkpoint(base, adapter, f"{base}/")
    assert (base / "config.json").read_text() == "{not json"


def test_the_command_line_writes_a_model_folder(tmp_path):
    base, adapter, merged = _llama(tmp_path)
    out = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "lowrank", "merge", str(base), str(adapter), "-o", str(out),
         "--dtype", "float32"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "config.json, generation_config.json, tokenizer_config.json copied" in done.stdout
    assert (out / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(6)[None]
    with torch.no_grad():
        assert math.isclose(
            float((loaded(ids).logits - merged(ids).logits).abs().max()), 0.0, abs_tol=1e-5
        )


@pytest.mark.skipif(not os.path.isfile("/proc/self/mem"), reason="needs Linux's /proc")
def test_an_unreadable_companion_is_named_and_leaves_nothing(tmp_path):
    """/proc/self/mem is a regular file that opens but fails to read at offset 0 (EIO), even
    for root: the error names it, the file it was read for is no output, nothing is left."""
    base, adapter, _ = _llama(tmp_path)
    (base / "notes.txt").symlink_to("/proc/self/mem")
    out = tmp_path / "merged"
    with pytest.raises(FileFormatError, match=r"cannot read .*notes\.txt"):
        merge_checkpoint(base, adapter, f"{out}/")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_weights_of_other_formats_are_not_copied(tmp_path):
    base, adapter, _ = _llama(tmp_path)
    for name in ("rust_model.ot", "model.onnx_data", "model.tflite", "flax_model.msgpack"):
        (base / name).write_bytes(b"\0" * 64)
    report = merge_checkpoint(base, adapter, f"{tmp_path / 'merged'}/")
    assert sorted(p.rsplit("/", 1)[-1] for p in report["copied_files"]) == [
        "config.json", "generation_config.json", "tokenizer_config.json"
    ]


def test_a_merge_into_a_folder_of_the_other_layout_is_refused(tmp_path):
    """A folder holding an older merge as shards (an index) and the new one as one file, or
    the reverse, loads as the older one: transformers takes model.safetensors before the
    index, lowrank's Checkpoint the index before model.safetensors."""
    base, adapter, _ = _llama(tmp_path / "one")
    sharded, sharded_adapter, _ = _llama(tmp_path / "many", "40KB")
    cases = [
        ((sharded, sharded_adapter), (base, adapter), r"holds the index model\.safetensors\.index"),
        ((base, adapter), (sharded, sharded_adapter), r"holds model\.safetensors, a checkpoint of"),
    ]
    for i, (older, newer, words) in enumerate(cases):
        out = f"{tmp_path / f'merged{i}'}/"
        merge_checkpoint(*older, out)
        before = {p.name: p.read_bytes() for p in (tmp_path / f"merged{i}").iterdir()}
        with pytest.raises(OutputPathError, match=words):
            merge_checkpoint(*newer, out)
        assert {p.name: p.read_bytes() for p in (tmp_path / f"merged{i}").iterdir()} == before


def test_dtype_is_stated_for_the_nested_models_of_a_multimodal_config(tmp_path):
    """A multimodal config nests its models' configs (`text_config`, `vision_config`), each
    stating a dtype: all weights are written in `dtype`, so each states it; other nested
    objects (a `rope_parameters`) and key order stay."""
    base, adapter, _ = _llama(tmp_path)
    config = json.loads((base / "config.json").read_text())
    dtype_key = "dtype" if "dtype" in config else "torch_dtype"
    config["text_config"] = {"model_type": "llama", dtype_key: "float32", "hidden_size": 32}
    config["vision_config"] = {"model_type": "siglip_vision_model", "torch_dtype": None}
    config["rope_scaling"] = {"rope_type": "default", "dtype": "float32"}  # not a model's
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "merged"
    merge_checkpoint(base, adapter, f"{out}/", dtype="float16")
    written = json.loads((out / "config.json").read_text())
    expected = {
        **config,
        dtype_key: "float16",
        "text_config": {"model_type": "llama", dtype_key: "float16", "hidden_size": 32},
        "vision_config": {"model_type": "siglip_vision_model", "torch_dtype": "float16"},
    }
    assert written == expected and list(written) == list(expected)
