"""Regex patterns from adapter configs and targets: any regex Python's `re` takes is
matched as `re` matches it, in time linear in the name's length (a pattern on which `re`
itself would take exponential time included), but those holding a construct no matcher
answers so (a backreference, a conditional, an atomic group, a possessive repeat), which
are refused before any name is matched; the patterns people write are matched as PEFT
matches them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from io_helpers import deadline, digest, listing, lora_factors
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank import errors
from lowrank.cli import main
from lowrank.forms import LoRA
from lowrank.io import Adapter, load_adapter, merge_checkpoint, save_adapter
from lowrank.io.formats.peft import check_config, pattern_key, selection
from lowrank.nn import inject

HOSTILE = r"(a|aa)*c"  # on n a's, re tries fib(n) ways: ~1 s at n = 30, ×1.6 per a
LONG = "a" * 40  # a module name on which re runs HOSTILE for minutes
REFUSED = r"(a)\1"  # a backreference

# the hostile pattern in each field of a PEFT config that is matched against module names
HOSTILE_FIELDS = {
    "rank_pattern": {"rank_pattern": {HOSTILE: 2}},
    "alpha_pattern": {"alpha_pattern": {HOSTILE: 4}},
    "target_modules": {"target_modules": HOSTILE},
    "exclude_modules": {"exclude_modules": HOSTILE},
    "modules_to_save": {"modules_to_save": [HOSTILE]},
    "layers_pattern": {"layers_pattern": HOSTILE, "layers_to_transform": [0],
                       "target_modules": ["q"]},
}  # fmt: skip


def peft_folder(tmp_path: Path, change: dict, name: str = LONG) -> Path:
    """A PEFT folder with one LoRA layer on a module named `name`, its config updated by
    `change`."""
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "peft"
    save_adapter(Adapter({name: LoRA(*lora_factors((4, 6), 2, g), scale=1.0)}), folder, "peft")
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    return folder


@pytest.mark.parametrize("field", list(HOSTILE_FIELDS))
@pytest.mark.parametrize("name", [LONG + ".q", "a" * 39 + "c", "a" * 39 + "c.0.q"])
def test_a_pattern_with_exponential_backtracking_is_answered_at_once(tmp_path, field, name):
    """On a module named by 40 a's, `re` would take minutes (PEFT hangs); lowrank answers
    as `re` would: no match, which leaves the module out where the field selects it (with
    a c instead of the last a, `re` matches at once: the module is left out where the
    field leaves out)."""
    folder = peft_folder(tmp_path, HOSTILE_FIELDS[field], name)
    end = "long" if name == LONG + ".q" else "c" if name.endswith("c") else "index"
    leaves_out = {  # the field leaving the module out, by how the name ends
        ("target_modules", "long"): "target_modules", ("target_modules", "index"):
        "target_modules", ("exclude_modules", "c"): "exclude_modules",
        ("modules_to_save", "c"): "modules_to_save", ("modules_to_save", "index"):
        "modules_to_save", ("layers_pattern", "long"): "layers_to_transform",
        ("layers_pattern", "c"): "target_modules",  # ["q"] names no suffix of it
    }.get((field, end))  # fmt: skip
    with deadline(5):
        if leaves_out is None:
            assert list(load_adapter(folder).layers) == [name]
        else:
            named = rf"module '{re.escape(name)}' has LoRA factors, but .*'s {leaves_out} leaves"
            with pytest.raises(errors.FileFormatError, match=named):
                load_adapter(folder)


# each field of a PEFT config matched against module names, holding `REFUSED`
REFUSED_FIELDS = {
    "rank_pattern": {"rank_pattern": {REFUSED: 2}},
    "alpha_pattern": {"alpha_pattern": {REFUSED: 4}},
    "target_modules": {"target_modules": REFUSED},
    "exclude_modules": {"exclude_modules": REFUSED},
    "modules_to_save": {"modules_to_save": [REFUSED]},
    "layers_pattern": {"layers_pattern": REFUSED, "layers_to_transform": [0]},
}


@pytest.mark.parametrize("field", list(REFUSED_FIELDS))
def test_a_backreference_is_refused_naming_the_field(tmp_path, field):
    folder = peft_folder(tmp_path, REFUSED_FIELDS[field])
    named = rf"adapter_config\.json: {field}( key)? '\(a\)\\\\1' holds a backreference"
    with pytest.raises(errors.FileFormatError, match=named):
        load_adapter(folder)


@pytest.mark.parametrize("field", ["rank_pattern", "layers_pattern"])
def test_the_command_line_refuses_it_in_one_line_writing_nothing(tmp_path, capsys, field):
    folder = peft_folder(tmp_path, REFUSED_FIELDS[field])
    before = (listing(tmp_path), digest([tmp_path]))
    for argv in (["inspect", folder], ["convert", folder, "--to", "kohya", "-o",
                                       tmp_path / "out.safetensors"]):  # fmt: skip
        status = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert status == 2 and out == "" and err.count("\n") == 1
        assert err.startswith("lowrank: error: ") and "holds a backreference" in err
        assert field in err and "adapter_config.json" in err
    assert (listing(tmp_path), digest([tmp_path])) == before


def test_a_hostile_target_regex_selects_as_re_and_a_refused_one_is_an_error(tmp_path, capsys):
    model = nn.ModuleDict({LONG: nn.Linear(6, 4), "a" * 39 + "c": nn.Linear(6, 4)})
    with deadline(5):
        inject(model, f"re:{HOSTILE}", rank=2)
    assert isinstance(model[LONG], nn.Linear) and not isinstance(model["a" * 39 + "c"], nn.Linear)
    model = nn.ModuleDict({LONG: nn.Linear(6, 4)})
    with pytest.raises(errors.TargetError, match=r"target 're:\(a\)\\\\1' holds a backref"):
        inject(model, f"re:{REFUSED}", rank=2)
    assert isinstance(model[LONG], nn.Linear)
    config = tmp_path / "targets.json"
    config.write_text(json.dumps({f"re:{REFUSED}": {"r": 2}}))
    status = main(["bounds", "--model", "model_factories:mlp_head", "--targets-config",
                   str(config)])  # fmt: skip
    _, err = capsys.readouterr()
    assert status == 2 and err.count("\n") == 1 and "holds a backreference" in err


@pytest.mark.parametrize(
    ("pattern", "refused"),
    [(r"(a+)+", None), (r"(a?a?)*c", None), (r"(.*a){20}", None), (r"(\.\d+)+", None),
     (r"(?:(a)|b)*\1", "holds a backreference"), (r"(y)?(?:(?(1)a|bb)c)*", "holds a conditional"),
     (r"(?>a|ab)c", "holds an atomic group"), (r"a*+b", "holds a possessive repeat"),
     (r"(?:a{1000}){1000}", "needs more than 8192 automaton states")],
)  # fmt: skip
def test_nested_repeats_are_taken_and_what_has_no_linear_matching_is_refused(pattern, refused):
    """The old guard refused nested repeats, on which `re` can take exponential time; they
    are matched in linear time now."""
    config = {"target_modules": pattern}
    if refused is None:
        check_config(config, "cfg")
        return
    with pytest.raises(errors.FileFormatError, match=f"target_modules .* {refused}"):
        check_config(config, "cfg")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"target_modules": "x" * 8193},
         r"target_modules 'x{80}'… is longer than 8192 \(8193 "),
        ({"rank_pattern": {"a{99999999999}": 2}}, "rank_pattern key 'a.* is not a valid"),
        ({"target_modules": "(" * 499 + ")" * 499}, "is not a valid regular expression"),
        ({"layers_pattern": "layers|h", "layers_to_transform": [0]},
         r"layers_pattern 'layers\|h' does not end in the layer index .* outside any group"),
        ({"layers_pattern": "layers\\", "layers_to_transform": [0]},
         r"layers_pattern 'layers\\\\' does not end in the layer index"),
    ],
    ids=["long", "huge_count", "deep", "layers_branch", "layers_escape"],
)  # fmt: skip
def test_long_and_unparseable_patterns_are_refused(change, named):
    """A count too large for `re` raised OverflowError, groups nested too deep a
    RecursionError; a `layers_pattern` with a top-level `|` or a final backslash turns
    PEFT's regex into one that reads no index on some matches."""
    with pytest.raises(errors.FileFormatError, match=named):
        check_config(change, "cfg")


def test_a_long_pattern_listing_module_names_is_taken():
    """Up to 8 KiB: a regex listing the module names of many layers."""
    names = [f"model.layers.{i}.{p}_proj" for i in range(2000) for p in "qkvo"]
    regex = "|".join(map(re.escape, names))[:8192].rpartition("|")[0]
    config = check_config({"target_modules": regex}, "cfg")
    for name in ("model.layers.3.self_attn.q_proj", "model.layers.3.q_proj"):
        assert (selection(config, name) is None) == (re.fullmatch(regex, name) is not None)


NAMES = [
    *(f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qkvo"),
    *(f"model.layers.{i}.mlp.{p}_proj" for i in range(3) for p in ("gate", "up", "down")),
    "model.embed_tokens", "lm_head", "score", "classifier.dense", "classifier.out_proj",
    *(f"down_blocks.{b}.attentions.0.transformer_blocks.0.attn{a}.{p}"
      for b in range(2) for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.proj_out",
    "down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.2.conv_shortcut",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    *(f"{side}.block.{i}.layer.{j}.{kind}.{p}" for side in ("encoder", "decoder")
      for i in range(2) for j, kind in enumerate(("SelfAttention", "EncDecAttention"))
      for p in "qkvo"),
    "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc",
    *(f"model.vision_tower.layers.{i}.{p}" for i in range(2) for p in ("q_proj", "mlp.fc1")),
    *(f"model.language_model.layers.{i}.{p}" for i in range(2)
      for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.act")),
    "model.text_model.encoder.layers.0.self_attn.out_proj", "model.vision_tower.attn.k_proj",
    "model.layers.0.self_attn.q_proj." * 15 + "v_proj",  # 486 characters, under the cap of 512
]  # fmt: skip

# what Unsloth's vision fine-tunes save as `target_modules` (the old guard refused it)
UNSLOTH = (
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?"
    r"(?:k_proj|v_proj|q_proj|out_proj|fc1|fc2|o_proj|gate_proj|up_proj|down_proj).*?)|"
    r"(?:\bmodel\.layers\.[\d]{1,}\.(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\."
    r"(?:(?:k_proj|v_proj|q_proj|out_proj|fc1|fc2|o_proj|gate_proj|up_proj|down_proj)))"
)

# configs as PEFT's docs, tests and common training scripts write them
BENIGN = [
    {"target_modules": r".*\.(q_proj|v_proj)"},
    {"target_modules": r"^(?!.*lm_head).*"},
    {"target_modules": r"(.*\.)?layers\.\d+\.self_attn\.(q|k|v)_proj"},
    {"target_modules": r"model\.layers\.\d+\.mlp\..*"},
    {"target_modules": r".*(attn1|attn2).*to_(k|q|v|out\.0)"},
    {"target_modules": r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$"},
    {"target_modules": r".*\.(?:to_[qkv]|to_out\.0|proj_in|proj_out|conv\d|conv_shortcut)"},
    {"target_modules": r".*(?<!lm_head)$", "modules_to_save": ["classifier", "score"]},
    {"target_modules": ["q_proj", "v_proj", "q", "v"], "layers_to_transform": [0, 1],
     "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "q", "c_attn"], "layers_to_transform": [1],
     "layers_pattern": ["layers", "block", "h"]},
    {"target_modules": ["q_proj", "q"], "layers_to_transform": 0,
     "layers_pattern": r"(layers|block)"},
    {"target_modules": ["q_proj", "k_proj", "to_q", "dense"],
     "exclude_modules": r".*lm_head.*|.*embed.*|.*classifier.*"},
    {"target_modules": ["to_q", "to_k", "q_proj", "dense"], "exclude_modules": ["down_blocks.1"],
     "modules_to_save": ["classifier.*", r"lm_\w+"]},
    {"target_modules": ["q_proj", "v_proj", "to_q", "to_v", "q", "v"],
     "rank_pattern": {"q_proj": 4, "model.layers.0.self_attn.v_proj": 8,
                      r"^model.layers.1.mlp.*": 2, r"layers\.\d+\.mlp\.(up|down)_proj": 3,
                      r"attn1.to_(q|k)": 6, r".*decoder.*\.v": 5},
     "alpha_pattern": {r"down_blocks\.\d+\..*attn2\..*": 16, "v": 2, r"(.*\.)?block\.1\..*": 3}},
    # lookaheads, and a layer index in a group between literal dots
    {"target_modules": r"^(?=.*layers)(?!.*vision).*proj.*"},
    {"target_modules": r"(?!.*vision).*\.(\d+)\.self_attn\.(?=[qv]_).*_proj"},
    {"target_modules": r".*(?<!vision_tower)\.layers\.\d+\..*(?<=mlp)\.\w+_proj"},
    {"target_modules": ["q_proj", "fc1", "up_proj"],
     "rank_pattern": {r".*\.(\d+)\..*q_proj": 4, r"^(?=.*layers)(?!.*vision).*proj.*": 2,
                      r".*\.(\d+)\..*self_attn\.k_proj": 5},
     "alpha_pattern": {r"(?!.*vision).*\.(1)\..*": 8, r".*(?<!mlp)\.fc1": 3}},
    # patterns the old guard refused (too many repeats one after another)
    {"target_modules": UNSLOTH},
    {"target_modules": UNSLOTH.replace("language|text", "vision"), "exclude_modules": r".*\.0\..*"},
    {"target_modules": r".*language.*layers.*self_attn.*proj"},
    {"target_modules": ["q_proj", "v_proj", "down_proj", "o_proj"],
     "rank_pattern": {r".*layers.*mlp.*": 2, r".*language.*\.1\..*attn.*": 3},
     "alpha_pattern": {r".*lang.*_model.*o_proj": 4}, "modules_to_save": [r".*\.act"]},
]  # fmt: skip


@pytest.mark.parametrize("settings", BENIGN, ids=range(len(BENIGN)))
def test_the_patterns_people_write_select_as_in_peft(settings):
    """Each config is accepted, and picks the modules PEFT's own matching picks
    (`check_target_module_exists`), with the `rank_pattern` / `alpha_pattern` key PEFT
    looks up (`get_pattern_key`)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    config = check_config({"r": 1, "lora_alpha": 1, **settings}, "cfg")
    theirs = peft.LoraConfig(**settings)
    picked = 0
    for name in NAMES:
        expected = bool(check_target_module_exists(theirs, name))
        assert (selection(config, name) is None) == expected, name
        picked += expected
        for key in ("rank_pattern", "alpha_pattern"):
            patterns = settings.get(key, {})
            found = get_pattern_key(list(patterns), name)
            assert pattern_key(patterns, name, "cfg") == (found if found in patterns else None)
    assert 0 < picked < len(NAMES)


_KEY_PART = st.text(alphabet="ab._\n", max_size=5)


@settings(max_examples=120, deadline=None)
@given(
    keys=st.lists(
        st.tuples(_KEY_PART, st.sampled_from(["", "^", r"\A", "(?s)"]), st.booleans(),
                  st.sampled_from(["", "x", "(?:x)", "[a.]", "a+", ")|(a"])),
        min_size=1, max_size=6,
    ),
    name=st.text(alphabet="ab._\nx", max_size=12),
)  # fmt: skip
def test_pattern_keys_are_looked_up_as_re_matches_them(keys, name):
    r"""`pattern_key` against `re.match(rf"(.*\.)?({key})$", name)` key after key (PEFT's
    rule): literal keys (escaped or not, anchored or not: looked up by the name's dotted
    suffixes) beside regexes, on names with dots and newlines (`.*` crosses none, `$`
    holds before a final newline); keys that are regexes only inside PEFT's wrapping
    (`a)|(b`) or not even there (`(?s)a`: global flags not at its start, a FileFormatError
    naming it)."""
    patterns = {}
    for text, anchor, escaped, tail in keys:
        key = anchor + (re.escape(text) if escaped else text) + tail
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error:
            with pytest.raises(errors.FileFormatError, match=re.escape(repr(key))):
                pattern_key({key: 1}, name, "cfg")
            continue
        patterns.setdefault(key, 1)
    expected = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)
    assert pattern_key(patterns, name, "cfg") == expected


@pytest.mark.parametrize("key", ["(?s)abc", "(?x)a b", "(?u)abc"])
def test_a_literal_key_with_global_flags_is_refused_as_re_refuses_its_regex(key):
    r"""`(.*\.)?((?s)abc)$` is no regex (`re`: global flags not at the start), though the
    key alone is a literal: refused naming the key, not matched as `abc`."""
    with pytest.raises(re.error):
        re.compile(rf"(.*\.)?({key})$")
    with pytest.raises(errors.FileFormatError, match=re.escape(repr(key))):
        pattern_key({key: 4}, "x.abc", "cfg")


@pytest.mark.parametrize("name", ["a", "a.q_proj", "x.b", "b", "zzz", "x.a"])
def test_a_key_closing_its_group_matches_as_re(name):
    r"""`a)|(b` is no regex alone but `(.*\.)?(a)|(b)$` is one: matched as `re` does."""
    key = "a)|(b"
    expected = key if re.match(rf"(.*\.)?({key})$", name) else None
    assert pattern_key({key: 4}, name, "cfg") == expected


def test_many_literal_keys_are_looked_up_as_peft_looks_them_up():
    """373 keys of whole module names (`^` + the escaped name, as lowrank writes a
    per-layer rank_pattern) and plain names among them: the key PEFT's `get_pattern_key`
    finds for each of a Llama's names."""
    pytest.importorskip("peft")
    from peft.utils.other import get_pattern_key

    names = [f"model.layers.{i}.{part}" for i in range(60)
             for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]  # fmt: skip
    keys = ["^" + re.escape(n) for n in names[::2]] + ["q_proj", r"layers\.7\..*", "v_proj"]
    patterns = dict.fromkeys(keys, 4)
    for name in [*names, "other.q_proj", "model.layers.7.mlp.up_proj"]:
        found = get_pattern_key(list(patterns), name)
        assert pattern_key(patterns, name, "cfg") == (found if found in patterns else None)


def test_an_adapters_modules_to_save_regex_is_checked_when_it_is_made(tmp_path):
    """`Adapter.model`'s `modules_to_save` entries are regexes PEFT (and a PEFT writer,
    keeping adapted modules out of them) matches against module names."""
    g = torch.Generator().manual_seed(0)
    layers = {LONG: LoRA(*lora_factors((4, 6), 2, g), scale=1.0)}
    named = r"model\['modules_to_save'\]\[1\] '\(a\)\\\\1' holds a backreference"
    with pytest.raises(errors.ArgumentError, match=named):
        save_adapter(Adapter(layers, model={"modules_to_save": ["head", REFUSED]}),
                     tmp_path / "out", "peft")  # fmt: skip
    assert not (tmp_path / "out").exists()
    with pytest.raises(errors.ArgumentError, match=r"modules_to_save'\]\[0\] must be a non-empty"):
        Adapter(layers, model={"modules_to_save": [3]})


# a real name of about 300 characters: the longest kind of PEFT key (`base_model.model.`,
# a multimodal model's nesting, a diffusers transformer block of an SDXL UNet)
REAL_LONG = ("base_model.model.model.language_model.vision_tower.unet.down_blocks.2.attentions.1"
             ".transformer_blocks.9.attn2.processor.to_out.0.base_layer.wrapped_module.inner"
             ".experts.127.mlp.gate_up_proj.original_module.modules_to_save.default.lora_layer"
             ".adapter_stack.block_sparse_moe.shared_expert.w1")  # fmt: skip
TOO_LONG = "a" * 20_000  # a `.*\.(q_proj|v_proj)` match on it alone takes seconds


def long_key_files(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A PEFT folder with one LoRA layer on module `name` (`target_modules` a regex, which
    selection matches against the name) and a base checkpoint holding `name.weight` and
    `q_proj.weight`."""
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "peft"
    save_adapter(Adapter({name: LoRA(*lora_factors((4, 6), 2, g), scale=1.0)}), folder, "peft")
    config_path = folder / "adapter_config.json"
    config = {**json.loads(config_path.read_text()), "target_modules": r".*\.(q_proj|v_proj)|a+"}
    config_path.write_text(json.dumps(config))
    base = tmp_path / "base.safetensors"
    save_file({f"{name}.weight": torch.randn(4, 6, generator=g),
               "q_proj.weight": torch.randn(4, 6, generator=g)}, base)  # fmt: skip
    return folder, base


def test_a_file_with_a_too_long_key_is_refused_at_once(tmp_path, capsys):
    """By `load_adapter`, `merge_checkpoint` (the base's keys, and an index's) and the
    command line (one line, exit 2, nothing written), before any regex matches the key."""
    folder, base = long_key_files(tmp_path, TOO_LONG)
    named = r"adapter_model\.safetensors: key 'base_model\.model\.a{63}'… is 20031 characters"
    with deadline(5), pytest.raises(errors.FileFormatError, match=named):
        load_adapter(folder)
    ok, _ = long_key_files(tmp_path / "ok", "q_proj")
    out = tmp_path / "merged.safetensors"
    named = r"base\.safetensors: key 'a{80}'…"
    with deadline(5), pytest.raises(errors.FileFormatError, match=named):
        merge_checkpoint(base, ok, out)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {f"{TOO_LONG}.weight": "base.safetensors"}}))
    with deadline(5), pytest.raises(errors.FileFormatError, match=r"index\.json: key 'a{80}'…"):
        merge_checkpoint(index, ok, out)
    before = (listing(tmp_path), digest([tmp_path]))
    kohya = tmp_path / "k.safetensors"
    for argv in (["inspect", folder], ["merge", base, ok, "-o", out],
                 ["convert", folder, "--to", "kohya", "-o", kohya]):  # fmt: skip
        with deadline(5):
            status = main([str(a) for a in argv])
        stdout, err = capsys.readouterr()
        assert status == 2 and stdout == "" and err.count("\n") == 1, err
        assert err.startswith("lowrank: error: ") and "characters long, more than 512" in err
    assert (listing(tmp_path), digest([tmp_path])) == before


def test_real_long_names_load_and_merge(tmp_path):
    """A name of about 300 characters, as long as real ones get, is read, selected and
    merged: `base + scale · up @ down` in float64."""
    folder, base = long_key_files(tmp_path, REAL_LONG)
    config_path = folder / "adapter_config.json"
    config = {**json.loads(config_path.read_text()), "target_modules": r".*\.w1"}
    config_path.write_text(json.dumps(config))
    layer = load_adapter(folder).layers[REAL_LONG]
    merge_checkpoint(base, folder, tmp_path / "m.safetensors", dtype="float64")
    weight = load_file(base)[f"{REAL_LONG}.weight"].double()
    expected = weight + layer.scale * layer.up.double() @ layer.down.double()
    merged = load_file(tmp_path / "m.safetensors")[f"{REAL_LONG}.weight"]
    torch.testing.assert_close(merged, expected)


# patterns the old guard refused (more than three repeats one after another, counting
# PEFT's wrapping; chains of optional parts), each with a regex of the same language on
# which `re` is fast, and names on which `re` takes seconds to hours on the first
FORMERLY_REFUSED = [
    ({"rank_pattern": {r".*a.*b.*": 2}}, r".*a.*b.*"),
    ({"alpha_pattern": {r"x.+y.+z\d+": 2}}, r"x.+y.+z\d+"),
    ({"target_modules": r".*.*.*.*x"}, r".*x"),
    ({"modules_to_save": [r".*b.*c"]}, r".*b.*c"),
    ({"exclude_modules": r"(.*\.)?(.*.*.*.*.*.*x)$"}, r".*x"),
    ({"target_modules": r".*(?=.*.*.*y)"}, None),
    ({"rank_pattern": {r"(?=.*.*.*y).*": 2}}, r"(?=.*y).*"),
    ({"target_modules": r".*.*.*\d+\."}, r".*\d\."),
    ({"alpha_pattern": {r".*.*(\d+)\.": 2}}, r".*\d\."),
    ({"target_modules": ".*.*.*" + "a" * 100 + "b"}, ".*" + "a" * 100 + "b"),
    ({"target_modules": ".*.*.*(?:ab){200}"}, ".*(?:ab){200}"),
    ({"rank_pattern": {"a?" * 28 + "a" * 28: 2}}, "a{28,56}"),
    ({"target_modules": "(?:a|)" * 24 + "a" * 24}, "a{24,48}"),
]
LONG_NAMES = ["a" * 512, "a." * 255 + "bx", "1." * 256, "ab" * 256, "y" + "a" * 510 + "b"]


@pytest.mark.parametrize(("config", "same"), FORMERLY_REFUSED, ids=range(len(FORMERLY_REFUSED)))
def test_patterns_with_many_repeats_are_taken_and_answered_on_long_names(config, same):
    """Accepted, and on names of the most characters a file may hold the module is
    selected (with the pattern key) as `re` selects it by the regex of the same language;
    the deadline only guards against a hang (`tests/test_regex.py` bounds the work)."""
    checked = check_config({"r": 1, "lora_alpha": 1, **config}, "cfg")
    field, value = next(iter(config.items()))
    pattern = next(iter(value)) if isinstance(value, (dict, list)) else value
    for name in LONG_NAMES:
        with deadline(5):
            if field in ("rank_pattern", "alpha_pattern"):
                found = pattern_key(value, name, "cfg")
                expected = re.match(rf"(.*\.)?({same})$", name)
                assert (found == pattern) == (expected is not None), name[:20]
            else:
                picked = selection(checked, name)
                if same is None:  # `.*(?=.*.*.*y)` fullmatches no name: y after its end
                    assert picked == "target_modules"
                    continue
                expected = {"target_modules": re.fullmatch, "exclude_modules": re.fullmatch,
                            "modules_to_save": lambda r, n: re.match(rf"(^|.*\.){r}($|\..*)",
                                                                     n)}[field](same, name)
                left_out = picked == field
                assert left_out == ((expected is None) == (field == "target_modules")), name


@pytest.mark.parametrize("regex", [".*a.*b.*c.*", "(?=.*a.*b.*c).*", "(?:a|aa)" * 24 + "c"])
def test_many_repeats_in_a_target_select_as_re(regex):
    """`inject` adapts the modules `re` fullmatches (checked on short names, where `re` is
    fast)."""
    model = nn.ModuleDict({"abc": nn.Linear(6, 4), "cab": nn.Linear(6, 4),
                           "a" * 24 + "c": nn.Linear(6, 4)})  # fmt: skip
    expected = {name for name in model if re.fullmatch(regex, name)}
    inject(model, f"re:{regex}", rank=2)
    assert {n for n, m in model.items() if not isinstance(m, nn.Linear)} == expected


def test_an_ambiguous_layer_index_is_refused_naming_the_config_pattern_and_module(tmp_path):
    """`layers(?:\\.\\d+)?` can end after `layers` (index 1) or after `layers.1` (index 2)
    in `model.layers.1.2.q`: `re` reads 2 (its greedy `?` tries the longer first), which
    lowrank does not guess; on `model.layers.1.q` there is one index, 1."""
    change = {"layers_pattern": r"layers(?:\.\d+)?", "layers_to_transform": [1],
              "target_modules": ["q"]}  # fmt: skip
    folder = peft_folder(tmp_path, change, "model.layers.1.2.q")
    named = (r"adapter_config\.json: layers_pattern 'layers\(\?:\\\\\.\\\\d\+\)\?' can end at "
             r"several places in module 'model\.layers\.1\.2\.q', each followed by a layer index "
             r"\(1, 2\)")  # fmt: skip
    with pytest.raises(errors.FileFormatError, match=named):
        load_adapter(folder)
    assert list(load_adapter(peft_folder(tmp_path / "one", change, "model.layers.1.q")).layers)
