"""The generated API page is in sync with the code and covers every public name; the pages'
examples, the tests they name and the timings they quote agree with the code and the result
files."""

import ast
import importlib
import json
import re
import runpy
import shlex
from pathlib import Path

import pytest
import torch

from lowrank import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_api_page_is_up_to_date() -> None:
    generator = runpy.run_path(str(DOCS / "gen_api.py"))
    assert (DOCS / "api.md").read_text(encoding="utf-8") == generator["render"](), (
        "docs/api.md is stale: run `python docs/gen_api.py`"
    )


def test_api_page_documents_every_exported_name() -> None:
    page = (DOCS / "api.md").read_text(encoding="utf-8")
    for module_name in ("lowrank", "lowrank.decompose", "lowrank.kernels", "lowrank.io",
                        "lowrank.nn"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name in ("decompose", "io"):  # subpackages, documented by their own sections
                continue
            assert f".{name}`" in page, f"{module_name}.{name} is missing from docs/api.md"


# --- what the pages say, checked against the code and the result files ---------------------


def _blocks(page: Path, language: str) -> list[str]:
    """The fenced code blocks of `page` opened with ```language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(encoding="utf-8"),
                      re.DOTALL | re.MULTILINE)


def _comment_matches(value: object, comment: str) -> bool | None:
    """Whether `value` is what a trailing `# comment` says it is: the value's repr, or the
    comment (or its part before a `:` that explains it, `# 286: the exact bound`) as a Python
    literal; None when the comment is prose."""
    if repr(value) == comment:
        return True
    for stated in (comment, comment.partition(":")[0]):
        try:
            return value == ast.literal_eval(stated)
        except (ValueError, SyntaxError):
            continue
    return None


@pytest.mark.parametrize(("page", "index"), [("README.md", 0), ("docs/forms.md", 0),
                                             ("docs/bounds.md", 0)])
def test_self_contained_examples_run_and_give_what_their_comments_say(page, index):
    """The example runs as written, statement by statement, and every expression whose
    trailing comment is a value (`# 28160`, `# Fraction(19, 18)`, a repr) gives that value."""
    source = _blocks(ROOT / page, "python")[index]
    lines = source.splitlines()
    namespace: dict[str, object] = {}
    checked = 0
    for statement in ast.parse(source).body:
        code = ast.get_source_segment(source, statement)
        if not isinstance(statement, ast.Expr):
            exec(compile(code, page, "exec"), namespace)
            continue
        value = eval(compile(code, page, "eval"), namespace)
        _, _, comment = lines[statement.end_lineno - 1].partition("  # ")
        verdict = _comment_matches(value, comment.strip())
        assert verdict is not False, f"{page}: `{code}` gives {value!r}, the page says {comment}"
        checked += verdict is True
    assert checked


def test_the_bounds_example_is_what_the_command_prints(capsys):
    command = "lowrank bounds --in 320 --out 320 --kernel 3 --rank 16"
    shown = next(block for block in _blocks(DOCS / "cli.md", "")
                 if block.startswith(f"$ {command}\n"))
    assert cli.main(command.split()[1:]) == 0
    assert shown == f"$ {command}\n{capsys.readouterr().out}"


def test_every_result_file_the_docs_name_exists():
    """Or is one a benchmark writes on a CUDA device: `<script>-cuda.json` (`harness.py`'s
    default) or a name a script gives (`gpu_check.py`)."""
    scripts = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "benchmarks").glob("*.py"))
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = page.read_text(encoding="utf-8")
        for path in set(re.findall(r"\bbenchmarks/results/[\w.+-]+\.json\b", text)):
            name = Path(path).name
            script = ROOT / "benchmarks" / name.replace("-cuda.json", ".py")
            assert (ROOT / path).exists() or name in scripts or script.exists(), (
                f"{page.name} names {path}, which is no file nor one a benchmark writes"
            )


def test_every_test_the_docs_name_exists():
    tests = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "tests").glob("*.py"))
    pages = [ROOT / "README.md", *(page for page in DOCS.glob("*.md") if page.name != "api.md")]
    for page in pages:
        for name in set(re.findall(r"\b(test_[a-z0-9_]+)\b", page.read_text(encoding="utf-8"))):
            assert f"def {name}(" in tests or (ROOT / "tests" / f"{name}.py").exists(), (
                f"{page.name} names {name}, which is no test nor test file"
            )


def test_swap_timings_are_the_recorded_ones():
    """docs/nn.md and docs/benchmarks.md quote the `swap_adapter` times of the result file."""
    result = json.loads((ROOT / "benchmarks/results/nn_overhead-cpu.json").read_text())
    swap = {row["case"]: row["swap_s"] for row in result["swap"]}
    alone = f"{swap['nothing else holds the weights'] * 1e3:.0f} ms"
    held = f"{swap['a state_dict() kept'] * 1e3:.0f} ms"
    nn_page = " ".join((DOCS / "nn.md").read_text(encoding="utf-8").split())
    assert f"take {held} instead of {alone}" in nn_page
    bench_page = " ".join((DOCS / "benchmarks.md").read_text(encoding="utf-8").split())
    assert f"takes {alone}, and {held} while" in bench_page


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def test_decomposition_tables_are_the_recorded_ones():
    """docs/decompose.md's SVD and Tucker2/CP tables are decompose-cpu.json's p50s and errors."""
    result = json.loads((ROOT / "benchmarks/results/decompose-cpu.json").read_text())
    rows = {(row["case"], row["shape"][0], row["rank"]): row for row in result["rows"]}
    page = (DOCS / "decompose.md").read_text(encoding="utf-8")
    for channels, rank in [(320, 8), (320, 64), (640, 8), (640, 64)]:
        cell = {case: rows[f"svd/{case}", channels, rank]
                for case in ("lowrank-exact", "lowrank-randomized", "torch.svd_lowrank")}
        assert (
            f"| {channels} | {rank} | {_ms(cell['lowrank-exact']['p50_ms'])} "
            f"| {_ms(cell['lowrank-randomized']['p50_ms'])} "
            f"| {_ms(cell['torch.svd_lowrank']['p50_ms'])} "
            f"| {cell['lowrank-exact']['rel_error']:.5f} "
            f"| {cell['lowrank-randomized']['rel_error']:.5f} |"
        ) in page
    for channels in (320, 640):
        for rank in (8, 16, 64):
            cases = ("tucker2/lowrank", "tucker2/tensorly", "cp/lowrank", "cp/tensorly")
            cell = {case: rows[case, channels, rank] for case in cases}
            assert (
                f"| {channels} | {rank} | {_ms(cell['tucker2/lowrank']['p50_ms'])} "
                f"| {_ms(cell['tucker2/tensorly']['p50_ms'])} "
                f"| {cell['tucker2/lowrank']['rel_error']:.4f} "
                f"| {_ms(cell['cp/lowrank']['p50_ms'])} | {_ms(cell['cp/tensorly']['p50_ms'])} "
                f"| {cell['cp/lowrank']['rel_error']:.4f} "
                f"/ {cell['cp/tensorly']['rel_error']:.4f} |"
            ) in page


def _sessions(page: Path) -> list[tuple[str, list[str]]]:
    """`(command, lines it prints)` of every `$ lowrank …` line of `page`'s plain blocks, in
    order; a `…` line stands for the lines left out from there on."""
    sessions: list[tuple[str, list[str]]] = []
    fenced = example = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced, example = not fenced, False
        elif fenced and line.startswith("$ lowrank "):
            sessions.append((line[2:], []))
            example = True
        elif example:
            sessions[-1][1].append(line.rstrip())
    return sessions


@pytest.mark.parametrize("commands", [
    pytest.param(("bounds", "inspect", "convert", "merge"), id="files"),
    pytest.param(("extract", "resize", "combine"), id="factor-tools",  # ~10 s on 2 cores
                 marks=pytest.mark.exhaustive),
])  # fmt: skip
def test_the_command_line_page_runs_as_shown(tmp_path, monkeypatch, capsys, commands):
    """Every `$ lowrank …` example of docs/cli.md of `commands`, run in order in a folder
    where docs/examples' scripts wrote the UNet, its fine-tune and the kohya LoRA the page
    uses, prints what the page shows (up to a `…`)."""
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng():
        for script in ("unet_pair.py", "kohya_lora.py"):
            runpy.run_path(str(DOCS / "examples" / script))
    sessions = [(command, shown) for command, shown in _sessions(DOCS / "cli.md")
                if command.split()[1] in commands]  # fmt: skip
    assert len(sessions) >= 5
    for command, shown in sessions:
        cli.main(shlex.split(command)[1:])
        captured = capsys.readouterr()
        printed = [line.rstrip() for line in (captured.out + captured.err).splitlines()]
        if "…" in shown:
            shown = shown[: shown.index("…")]
            printed = printed[: len(shown)]
        assert printed == shown, command
