"""Regex patterns from adapter configs and targets: one whose matching takes exponential
time (`re` backtracks through every way to match, without a time limit) is refused before
any name is matched; the patterns people write are matched as PEFT matches them."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from io_helpers import digest, listing, lora_factors
from torch import nn

from lowrank import errors
from lowrank.cli import main
from lowrank.forms import LoRA
from lowrank.io import Adapter, load_adapter, save_adapter
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


class Expired(BaseException):
    """Raised by `deadline`: no `Exception`, which code under test might catch."""


@contextmanager
def deadline(seconds: int):
    """Raise `Expired` in the block once `seconds` have passed (`re` checks for signals
    while it matches, so a match that would run for minutes ends here)."""

    def expire(*_: object) -> None:
        raise Expired(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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
