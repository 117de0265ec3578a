"""Compare two `compile_check.py` reports: per (kernel, case, dtype), the median SASS
instructions of the innermost loop (a K step), registers and spills of the configs both
compiled, before → after.

    python benchmarks/compare_compile.py BEFORE.json AFTER.json --out results/X.json

`--rename OLD NEW` compares the launches of AFTER whose case holds NEW with the launches of
BEFORE whose case holds OLD there instead (the same report may be given twice: a variant
against its default, e.g. "persistent" against "persistent, expand first").

Each report's header (Triton version, command, date, and the git commit it was run on when
`--label` gives it) is kept beside the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _key(result: dict) -> tuple:
    config = tuple(sorted(result["config"].items()))
    block_r = result["constexprs"].get("BLOCK_R")
    return result["kernel"], result["case"], result["dtype"], block_r, config


def compare(before: dict, after: dict, rename: tuple[str, str] | None = None) -> list[dict]:
    """Rows of medians over the configs present in both reports, grouped by launch kind;
    with `rename = (old, new)`, only AFTER's cases holding `new`, each against BEFORE's case
    with `old` in its place."""
    old = {_key(r): r for r in before["results"]}
    groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for result in after["results"]:
        key = _key(result)
        if rename is not None:
            if rename[1] not in result["case"]:
                continue
            key = (key[0], key[1].replace(rename[1], rename[0]), *key[2:])
        twin = old.get(key)
        if twin and twin["loop_instructions"] and result["loop_instructions"]:
            groups[_key(result)[:3]].append((twin, result))
    rows = []
    for (kernel, case, dtype), pairs in sorted(groups.items()):
        loop = [(b["loop_instructions"][0], a["loop_instructions"][0]) for b, a in pairs]
        rows.append({
            "kernel": kernel, "case": case, "dtype": dtype, "configs": len(pairs),
            "loop_before": statistics.median(b for b, _ in loop),
            "loop_after": statistics.median(a for _, a in loop),
            "max_registers_before": max(b["registers"] for b, _ in pairs),
            "max_registers_after": max(a["registers"] for _, a in pairs),
            "max_spill_before": max(b["spill_bytes"] for b, _ in pairs),
            "max_spill_after": max(a["spill_bytes"] for _, a in pairs),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", nargs=2, metavar=("BEFORE", "AFTER"), default=("", ""),
                        help="what each report was run on, e.g. two git commits")  # fmt: skip
    parser.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"),
                        help="compare AFTER's cases holding NEW with BEFORE's holding OLD")
    args = parser.parse_args(argv)
    reports = [json.loads(path.read_text()) for path in (args.before, args.after)]
    rows = compare(*reports, rename=tuple(args.rename) if args.rename else None)
    headers = [{k: v for k, v in report.items() if k != "results"} | {"label": label}
               for report, label in zip(reports, args.label, strict=True)]  # fmt: skip
    payload = {"before": headers[0], "after": headers[1],
               "command": " ".join(["python benchmarks/compare_compile.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
               "rows": rows}  # fmt: skip
    partial = args.out.with_suffix(".tmp")
    partial.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(partial, args.out)
    for row in rows:
        print(f"{row['kernel']:20s} {row['case']:36s} {row['dtype']:4s} n={row['configs']:2d} "
              f"loop {row['loop_before']:6.0f} -> {row['loop_after']:6.0f}  spill "
              f"{row['max_spill_before']} -> {row['max_spill_after']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
