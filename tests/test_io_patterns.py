"""Regex patterns from adapter configs and targets: one whose matching takes exponential
time (`re` backtracks through every way to match, without a time limit) is refused before
any name is matched; the patterns people write are matched as PEFT matches them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
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
LONG = "a" * 40  # a module name on which HOSTILE runs for minutes

# the hostile pattern in each field of a PEFT config that is matched against module names
HOSTILE_FIELDS = {
    "rank_pattern": {"rank_pattern": {HOSTILE: 2}},
    "alpha_pattern": {"alpha_pattern": {HOSTILE: 4}},
    "target_modules": {"target_modules": HOSTILE},
    "exclude_modules": {"exclude_modules": HOSTILE},
    "modules_to_save": {"modules_to_save": [HOSTILE]},
    "layers_pattern": {"layers_pattern": HOSTILE, "layers_to_transform": [0]},
}




def peft_folder(tmp_path: Path, change: dict) -> Path:
    """A PEFT folder with one LoRA layer on a module named `LONG`, its config updated by
    `change`."""
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "peft"
    save_adapter(Adapter({LONG: LoRA(*lora_factors((4, 6), 2, g), scale=1.0)}), folder, "peft")
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    return folder


@pytest.mark.parametrize("field", list(HOSTILE_FIELDS))
def test_a_pattern_with_exponential_matching_is_refused_at_once(tmp_path, field):
    folder = peft_folder(tmp_path, HOSTILE_FIELDS[field])
    named = rf"adapter_config\.json: {field}( key)? '\(a\|aa\)\*c' can take time exponential"
    with deadline(5), pytest.raises(errors.FileFormatError, match=named):
        load_adapter(folder)


@pytest.mark.parametrize("field", ["rank_pattern", "layers_pattern"])
def test_the_command_line_refuses_it_in_one_line_writing_nothing(tmp_path, capsys, field):
    folder = peft_folder(tmp_path, HOSTILE_FIELDS[field])
    before = (listing(tmp_path), digest([tmp_path]))
    for argv in (["inspect", folder], ["convert", folder, "--to", "kohya", "-o",
                                       tmp_path / "out.safetensors"]):  # fmt: skip
        with deadline(5):
            status = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert status == 2 and out == "" and err.count("\n") == 1
        assert err.startswith("lowrank: error: ") and "can take time exponential" in err
        assert field in err and "adapter_config.json" in err
    assert (listing(tmp_path), digest([tmp_path])) == before


def test_a_target_regex_with_exponential_matching_is_refused_at_once(tmp_path, capsys):
    model = nn.ModuleDict({LONG: nn.Linear(6, 4)})
    with deadline(5), pytest.raises(errors.TargetError, match="can take time exponential"):
        inject(model, f"re:{HOSTILE}", rank=2)
    assert isinstance(model[LONG], nn.Linear)
    config = tmp_path / "targets.json"
    config.write_text(json.dumps({f"re:{HOSTILE}": {"r": 2}}))
    with deadline(5):
        status = main(["bounds", "--model", "model_factories:mlp_head", "--targets-config",
                       str(config)])  # fmt: skip
    _, err = capsys.readouterr()
    assert status == 2 and err.count("\n") == 1 and "can take time exponential" in err


@pytest.mark.parametrize(
    "pattern",
    [r"(a+)+", r"(a?a?)*c", r"(.*a){20}", r"(?:(a)|b)*\1", r"(\.\d+)+", r"(y)?(?:(?(1)a|bb)c)*"],
)
def test_other_nested_repeats_are_refused(pattern):
    config = {"target_modules": pattern}
    with pytest.raises(errors.FileFormatError, match="can take time exponential"):
        check_config(config, "cfg")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"target_modules": "x" * 1001}, r"target_modules 'x{80}'… is longer than 1000 \(1001 "),
        ({"rank_pattern": {"a{99999999999}": 2}}, "rank_pattern key 'a.* is not a valid"),
        ({"target_modules": "(" * 499 + ")" * 499}, "is not a valid regular expression"),
    ],
    ids=["long", "huge_count", "deep"],
)
def test_long_and_unparseable_patterns_are_refused(change, named):
    """A count too large for `re` raised OverflowError, groups nested too deep a
    RecursionError."""
    with pytest.raises(errors.FileFormatError, match=named):
        check_config(change, "cfg")


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
    "model.layers.0.self_attn.q_proj." * 15 + "v_proj",  # 486 characters, under the cap of 512
]  # fmt: skip

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


def test_an_adapters_modules_to_save_regex_is_checked_when_it_is_made(tmp_path):
    """`Adapter.model`'s `modules_to_save` entries are regexes PEFT (and a PEFT writer,
    keeping adapted modules out of them) matches against module names."""
    g = torch.Generator().manual_seed(0)
    layers = {LONG: LoRA(*lora_factors((4, 6), 2, g), scale=1.0)}
    named = r"model\['modules_to_save'\]\[1\] '\(a\|aa\)\*c' can take time exponential"
    with deadline(5), pytest.raises(errors.ArgumentError, match=named):
        save_adapter(Adapter(layers, model={"modules_to_save": ["head", HOSTILE]}),
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


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"rank_pattern": {r".*a.*b.*": 2}}, r"rank_pattern key '\.\*a\.\*b\.\*' holds 4 repeats"),
        ({"alpha_pattern": {r"x.+y.+z\d+": 2}}, r"alpha_pattern key 'x\.\+y\.\+z\\\\d\+' holds 4"),
        ({"target_modules": r".*.*.*.*x"}, r"target_modules '\.\*.*' holds 4 repeats"),
        ({"modules_to_save": [r".*b.*c"]}, r"modules_to_save '\.\*b\.\*c' holds 4"),
        ({"layers_pattern": ".*x.*y.*", "layers_to_transform": [0]}, "layers_pattern '.*' holds 5"),
        ({"exclude_modules": r"(.*\.)?(.*.*.*.*.*.*x)$"}, r"exclude_modules .* holds 7"),
        ({"target_modules": r".*(?=.*.*.*y)"}, r"target_modules '\.\*\(\?=.*' holds 4"),
        ({"rank_pattern": {r"(?=.*.*.*y).*": 2}}, r"rank_pattern key '\(\?=.*' holds 4"),
        ({"target_modules": r".*.*.*\d+\."}, r"target_modules '\.\*.*' holds 4 repeats"),
        ({"alpha_pattern": {r".*.*(\d+)\.": 2}}, r"alpha_pattern key '.*' holds 4 repeats"),
        ({"target_modules": ".*.*.*" + "a" * 100 + "b"}, "holds 3 repeats and 3 optional parts"),
        ({"target_modules": ".*.*.*(?:ab){200}"}, "holds 3 repeats and 5 optional parts"),
    ],
    ids=["rank", "alpha", "target", "saved", "layers", "exclude", "lookahead", "lookahead_key",
         "scan", "scan_key", "run", "fixed_count"],
)
def test_a_pattern_with_too_many_repeats_is_refused_naming_the_field(config, named):
    """Matching a regex with `k` repeats of a count ranging over more than two values takes
    time growing as a name's length to the `k`; PEFT's wrapping (`(.*\\.)?(key)$` for a
    pattern key, `(^|.*\\.)name($|\\..*)` for `modules_to_save`) counts. A lookahead's
    repeats count after those before it (`.*(?=.*.*.*y)` took 11 s on `a` × 512); a run
    that ends in one place (`\\d+\\.`) multiplies nothing but is scanned each time it is
    reached (`.*.*.*\\d+\\.` took 56 s on `1` × 512); so is a long run of characters
    (`.*.*.*` then 100 a's took 8.5 s on `a` × 512, then `(?:ab){200}` 3.6 s on `ab` × 256)."""
    with pytest.raises(errors.FileFormatError, match=named):
        check_config(config, "cfg")


@pytest.mark.parametrize("field", ["rank_pattern", "target_modules"])
@pytest.mark.parametrize("part", ["a?", "(?:a|)", "(?:a|aa)", "(a|b|ab)"])
def test_a_chain_of_optional_parts_is_refused_in_time(field, part):
    """Each optional part (`?`) or choice of alternatives that can match at one place
    doubles the ways `re` may try: `a?` × 28 then `a` × 28 took 12.5 s against 29
    characters, `(?:a|)` × 24 then `a` × 24 0.6 s against 25 (× 2 for each one more). Six
    count as one wide repeat (two are free: PEFT's own wrapping has one); a key in PEFT's
    form with two wide repeats still passes."""
    chain = part * 28 + "a" * 28
    config = {"rank_pattern": {chain: 2}} if field == "rank_pattern" else {field: chain}
    with deadline(5), pytest.raises(errors.FileFormatError, match=r"holds [4-9] repeats"):
        check_config(config, "cfg")
    check_config({"rank_pattern": {r"(.*\.)?block\.1\..*": 2},
                  "target_modules": part * 3 + r".*\.(q|k|v|o|up|down|gate)_proj"}, "cfg")


@pytest.mark.parametrize(
    "regex", [".*a.*b.*c.*", ".*(?=.*a.*b.*c)", "(?:a|aa)" * 24 + "c", r".*.*.*\d+\."]
)
def test_too_many_repeats_in_a_target_are_refused(regex):
    model = nn.ModuleDict({"ab": nn.Linear(6, 4)})
    named = rf"target {re.escape(repr('re:' + regex)[:20])}.* holds 4 repeats"
    with pytest.raises(errors.TargetError, match=named):
        inject(model, f"re:{regex}", rank=2)
    assert isinstance(model["ab"], nn.Linear)


@pytest.mark.parametrize(
    ("regex", "match"),
    [(r"(.*?\.)?(.*?\..*?y)$", re.match), (r"(.*\.)?(.+.+y)$", re.match),
     (r".*.*.*y", re.fullmatch), (r"(^|.*\.).*z($|\..*)", re.match),
     (r"(.*\.)?(down_blocks\.\d+\..*attn2\..*)$", re.match),
     (r"(?=.*?.*?.*?y)(?=.*?.*?.*?y)(?=.*?.*?.*?y).*?.*?y", re.fullmatch),
     (r".*(?=.*?.*?y).*?.*?y", re.fullmatch), (r"(.*\.)?((?=.*.*y).*.*z)$", re.match),
     (r"(.*\.)?(.*\.(\d+)\..*q_proj)$", re.match)],
)
def test_the_slowest_accepted_patterns_match_a_longest_name_quickly(regex, match):
    """At `MAX_NAME_LENGTH` (≈ 1 s for the lazy ones at worst on one core)."""
    check_config({"target_modules": regex}, "cfg")
    for name in ("a" * 512, "a." * 256, "." * 512, "1." * 256, "y" + "a" * 511):
        with deadline(5):
            match(regex, name)
