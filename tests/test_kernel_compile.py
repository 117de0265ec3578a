"""The LoRA kernels compiled for an H100 (sm_90a) on this CPU machine, by Triton's real compiler.

The interpreter tests check the kernels' arithmetic but compile nothing. Here the bf16 launches
of the fused GEMMs (forward and dx) in a prefill at r = 16 (every regime, dropout on and off;
`QUICK_SKIPS` leaves out two that others prove) are compiled to PTX and assembled by
`ptxas`, each in one config (`largest_of_launch`: the largest of the flattened loop where one
is kept); the `exhaustive` run compiles every kernel
(the shrink, the row reductions and the one-pass backward too) in every config the pruners
keep, in bf16 and fp32, for a decode and a prefill (float32's forced-only "tf32x3" and the SASS
loop counts are left to `make compile-check`). A config over the device's shared memory would
fail to launch, one that spills registers or whose K loop is not pipelined would run slowly.
The compiler runs in a subprocess because conftest turns the interpreter on for this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import compile_check

pytestmark = pytest.mark.long  # among the suite's longest modules: scheduled first

BENCHMARKS = Path(compile_check.__file__).parent


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # no NVIDIA backend in this Triton build
        return False


needs_ptxas = pytest.mark.skipif(not _ptxas_available(), reason="Triton ships no ptxas here")


FUSED_GEMMS = ("lora_gemm_kernel", "lora_gemm_tma_kernel")
"""The kernels whose 128×256 tiles run near the register file's limit: the quick grid compiles
these (the others, smaller, in the `exhaustive` grid and `make compile-check`)."""

QUICK_SKIPS = {
    # the fused forwards without the store of t (EMIT_T off), in the config of their training
    # launches, which the quick grid compiles: the exhaustive grid compiles these
    "forward fused, inference",
    "forward persistent fused, inference",
}
"""Launches the quick grid leaves out, each proved by one it compiles (a cold compile is
about 2 CPU-seconds)."""

GRIDS = {
    "one per launch": ["--dtypes", "bfloat16", "--rows", "1024", "--configs", "one",
                "--kernels", *FUSED_GEMMS, "--skip-cases", *sorted(QUICK_SKIPS)],
    "every config": ["--dtypes", "bfloat16", "float32", "--rows", "16", "1024", "--configs", "all"],
}  # fmt: skip


@pytest.fixture(
    scope="module",
    params=["one per launch", pytest.param("every config", marks=pytest.mark.exhaustive)],
)
def report(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [
        sys.executable, "-W", "ignore", str(BENCHMARKS / "compile_check.py"), "--arch", "90",
        *GRIDS[request.param], "--shapes", "4096x4096",
        "--ranks", "16", "--precisions", "tf32", "--no-sass", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    dtypes = ["bf16", "fp32"] if "float32" in GRIDS[request.param] else ["bf16"]
    every = ("lora_gemm_kernel", "lora_gemm_tma_kernel", "shrink_kernel", "reduce_rows_kernel",
             "lora_backward_kernel")  # fmt: skip
    kernels = FUSED_GEMMS if "--kernels" in GRIDS[request.param] else every
    skipped = QUICK_SKIPS if "--skip-cases" in GRIDS[request.param] else set()
    return {"returncode": done.returncode, "stdout": done.stdout, "dtypes": dtypes,
            "kernels": set(kernels), "skipped": skipped,
            **json.loads(out.read_text())}  # fmt: skip


@needs_ptxas
def test_every_kept_config_compiles_within_the_h100s_resources(report):
    flagged = [line for line in report["stdout"].splitlines() if " !! " in line]
    assert report["returncode"] == 0, "\n".join(flagged[:40])
    assert all(r["shared_bytes"] <= compile_check.SMEM_OPTIN[90] for r in report["results"])
    kept = [r for r in report["results"] if not (r["fallback"] or r["forced"])]  # smem only
    assert kept and all(r["spill_bytes"] <= compile_check.SPILL_ALLOWANCE for r in kept)


@needs_ptxas
def test_registers_and_spills_are_those_of_the_binary_triton_built(report):
    """The resources come from the `ptxas` run that assembled each cubin, with Triton's own
    flags (Triton 3.9 adds `--regAllocOptLevel=2`, which moves registers and spills): the
    registers read from its log are those the cubin declares."""
    results = report["results"]
    assert all(r["registers"] == r["binary_registers"] > 0 for r in results), [
        (r["case"], r["registers"], r["binary_registers"]) for r in results
        if r["registers"] != r["binary_registers"]
    ]  # fmt: skip


@needs_ptxas
def test_every_launch_kind_was_compiled_and_pipelined(report):
    """Every launch of the grid compiled (the quick grid's `QUICK_SKIPS` aside, and those
    alone left out), each with a pipelined K loop."""
    results = report["results"]
    kinds = {(r["kernel"], r["case"], r["dtype"]) for r in results}
    assert {r["dtype"] for r in results} == set(report["dtypes"])
    assert {r["kernel"] for r in results} == report["kernels"]
    expected = set()
    for dtype in report["dtypes"]:
        for regime in ("fused", "two-phase"):
            for case in ("forward", "dx"):
                for dropout in ("", ", dropout"):
                    expected.add(("lora_gemm_kernel", f"{case} {regime}{dropout}", dtype))
        expected.remove(("lora_gemm_kernel", "forward two-phase, dropout", dtype))  # shrink's
        expected.add(("lora_gemm_kernel", "forward fused, inference", dtype))
        for case in ("forward persistent", "dx persistent", "dx persistent, dropout",
                     "forward persistent fused", "forward persistent fused, dropout",
                     "forward persistent fused, inference", "dx persistent fused",
                     "dx persistent fused, dropout", "forward persistent, expand first",
                     "dx persistent, expand first",
                     "dx persistent, expand first, dropout"):  # fmt: skip
            expected.add(("lora_gemm_tma_kernel", case, dtype))
        if report["kernels"] != set(FUSED_GEMMS):
            for case in ("shrink", "shrink, dropout", "shrink dy upᵀ"):
                expected.add(("shrink_kernel", case, dtype))
            for case in ("d_down", "d_up"):
                expected.add(("reduce_rows_kernel", case, dtype))
            for case in ("", ", d_down only", ", d_up only"):
                for dropout in ("", ", dropout"):
                    expected.add(("lora_backward_kernel", f"one-pass backward{case}{dropout}",
                                  dtype))  # fmt: skip
    assert report["skipped"] <= {case for _, case, _ in expected}
    assert not report["skipped"] & {case for _, case, _ in kinds}
    assert {kind for kind in expected if kind[1] not in report["skipped"]} <= kinds
    assert "forward two-phase, dropout" not in {case for _, case, _ in kinds}
    assert all(r["pipelined"] for r in results)
    assert any(r["config"].get("TILES_N", 1) > 1 for r in results)
    flattened = {r["case"] for r in results if r["config"].get("FLATTEN")}  # persistent, r = 16
    assert {"forward persistent", "forward persistent, expand first",
            "forward persistent fused"} <= flattened  # fmt: skip


@needs_ptxas
def test_tensor_cores_are_used_the_hopper_way_on_large_tiles(report):
    """64+-row tiles must issue wgmma (Hopper's warpgroup MMA), not the older mma.sync."""
    for r in report["results"]:
        if r["kernel"] in ("lora_gemm_kernel", "lora_gemm_tma_kernel") and (
            r["config"]["BLOCK_M"] >= 64
        ):
            assert r["tensor_core"] == "wgmma", r


@needs_ptxas
def test_the_persistent_kernel_loads_its_tiles_by_tma(report):
    persistent = [r for r in report["results"] if r["kernel"] == "lora_gemm_tma_kernel"]
    assert persistent and all(r["tma"] for r in persistent)
    assert not any(r["tma"] for r in report["results"] if r["kernel"] != "lora_gemm_tma_kernel")


def test_problems_flags_what_would_fail_or_crawl():
    base = compile_check.Compiled(
        case="forward", kernel="lora_gemm_kernel", dtype="bf16", config={}, constexprs={},
        shared_bytes=1000, registers=128, spill_bytes=0, pipelined=True, tensor_core="wgmma",
        compile_s=0.1,
    )  # fmt: skip
    assert compile_check.problems(base) == []
    over = compile_check.Compiled(**{**base.__dict__, "shared_bytes": 300_000})
    assert "shared memory" in compile_check.problems(over)[0]
    spilled = compile_check.Compiled(**{**base.__dict__, "spill_bytes": 4096})
    assert "spills" in compile_check.problems(spilled)[0]
    serial = compile_check.Compiled(**{**base.__dict__, "pipelined": False})
    assert "not pipelined" in compile_check.problems(serial)[0]
    untiled = compile_check.Compiled(**{**base.__dict__, "kernel": "lora_gemm_tma_kernel"})
    assert "no TMA" in compile_check.problems(untiled)[0]
    forced = compile_check.Compiled(**{**base.__dict__, "spill_bytes": 4096, "forced": True})
    assert compile_check.problems(forced) == []
    assert compile_check.problems(compile_check.Compiled(**{**forced.__dict__,
                                                            "shared_bytes": 300_000}))  # fmt: skip


def test_the_quick_checks_keep_the_largest_config_of_each_loop_or_launch():
    import triton

    def config(bm: int, bn: int, stages: int, flatten: bool | None = None, warps: int = 4):
        kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}
        kw |= {} if flatten is None else {"FLATTEN": flatten}
        return triton.Config(kw, num_warps=warps, num_stages=stages)

    small, wide, deep = config(64, 64, 4, False), config(128, 128, 3, False), config(128, 128, 4)
    crowded = config(128, 128, 4, False, warps=8)  # as many elements, over more warps
    flat_small, flat = config(64, 128, 3, True), config(128, 256, 2, True)
    configs = [small, wide, deep, crowded, flat_small, flat]
    assert compile_check.largest_per_loop(configs) == [deep, flat]
    assert compile_check.largest_per_loop([small]) == [small]
    assert compile_check.largest_of_launch(configs) == [flat]
    assert compile_check.largest_of_launch([small, wide, crowded]) == [wide]
    assert compile_check.largest_of_launch([]) == []


def test_tma_loads_count_as_pipelined_only_with_two_stages_of_buffers():
    bf16 = compile_check.Pointer("bf16", 2)
    boxes = {"x_desc": compile_check.Descriptor(bf16, [64, 64]),
             "w_desc": compile_check.Descriptor(bf16, [128, 64])}  # 24,576 B a stage  # fmt: skip
    tma = "cp.async.bulk.tensor.2d.shared::cluster.global"
    assert compile_check._pipelined(tma, boxes, 4 * 24_576 + 32)
    assert not compile_check._pipelined(tma, boxes, 24_576 + 32)
    assert not compile_check._pipelined("ld.global", boxes, 4 * 24_576)
    assert compile_check._pipelined("cp.async.cg.shared.global", {"x_ptr": bf16}, 0)


@pytest.mark.parametrize(
    ("bad", "named"),
    [(["--shapes", "4096y4"], "--shapes"), (["--shapes", "4096"], "--shapes"),
     (["--ranks", "0"], "--shapes"), (["--kernels", "lora_kernel"], "--kernels"),
     (["--skip-cases", "forward fused", "forward"], "no launch of the grid: ['forward']")],
)  # fmt: skip
def test_bad_grid_arguments_are_usage_errors(bad, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compile_check.main(bad)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IMAD R2, R3, R4, RZ ;
.L_x_1:
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0030*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
        /*0050*/                   FADD R6, R6, R7 ;
        /*0060*/               @P1 BRA `(.L_x_0) ;
        /*0070*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   ISETP.GE.AND P0, PT, R0, R1, PT ;
        /*00a0*/               @!P0 BRA `(.L_x_3) ;
"""


def test_loop_bodies_are_the_innermost_backward_branches_largest_first():
    """An outer loop of 6 instructions around an inner one of 3, a forward branch (no loop),
    and a second innermost loop of 2: the inner loops, not the outer one."""
    assert compile_check.loop_bodies(SASS) == [3, 2]
    assert compile_check.loop_bodies("") == []


def test_compare_pairs_a_variant_with_its_default_case_by_config():
    """`--rename`: each expand-first launch against the same config of its default case, in one
    report; configs without a twin and cases without the variant are left out."""
    import compare_compile

    def result(case: str, bm: int, loop: int, spill: int = 0) -> dict:
        return {"kernel": "lora_gemm_tma_kernel", "case": case, "dtype": "bf16",
                "config": {"BLOCK_M": bm}, "constexprs": {"BLOCK_R": 16}, "registers": 100,
                "spill_bytes": spill, "loop_instructions": [loop]}  # fmt: skip

    report = {"results": [
        result("dx persistent, dropout", 64, 90), result("dx persistent, dropout", 128, 95),
        result("dx persistent, expand first, dropout", 64, 80, spill=8),
        result("dx persistent, expand first, dropout", 128, 70),
        result("dx persistent, expand first, dropout", 256, 60),  # no twin
        result("forward persistent", 64, 50),
    ]}  # fmt: skip
    variant = ("persistent", "persistent, expand first")
    rows = compare_compile.compare(report, report, rename=variant)
    summary = [(r["case"], r["configs"], r["loop_before"], r["loop_after"], r["max_spill_after"])
               for r in rows]  # fmt: skip
    assert summary == [("dx persistent, expand first, dropout", 2, 92.5, 75, 8)]
    plain = compare_compile.compare(report, report)
    assert {r["case"]: r["loop_before"] == r["loop_after"] for r in plain} == {
        "dx persistent, dropout": True, "dx persistent, expand first, dropout": True,
        "forward persistent": True}  # fmt: skip
