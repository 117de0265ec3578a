"""Plot `benchmarks/lora_linear.py` results and write their table into docs/benchmarks.md.

    python benchmarks/plot_lora_linear.py                      # results/lora_linear-cuda*.json
    python benchmarks/plot_lora_linear.py --json X.json --docs none

The plot shows each method's time over dense `F.linear` at every grid point, one panel per
(mode, dtype); the table replaces the text between the two `lora_linear` markers in the docs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSONS = sorted((ROOT / "benchmarks" / "results").glob("lora_linear-cuda*.json"))
DEFAULT_PNG = ROOT / "benchmarks" / "results" / "lora_linear-cuda.png"
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- lora_linear:begin -->", "<!-- lora_linear:end -->"
COLUMNS = ("eager", "peft", "compile", "lycoris", "ours")
TARGET = {"forward": 1.05, "train": 1.10}
REGIMES = ("fused", "two_phase", "persistent", "persistent_fused")


def load(*paths: Path) -> tuple[list[dict], dict[tuple, dict[str, dict]]]:
    """The runs' environments (oldest first) and their rows grouped as
    {(mode, dtype, m, in, out, r): {method: row}}; a later run's row replaces an earlier
    run's for the same point and method."""
    payloads = sorted((json.loads(p.read_text()) for p in paths),
                      key=lambda payload: payload["environment"]["date"])  # fmt: skip
    points: dict[tuple, dict[str, dict]] = {}
    for payload in payloads:
        for row in payload["rows"]:
            mode = row["mode"] + (f", dropout {row['dropout']:g}" if row.get("dropout") else "")
            key = (mode, *(row[k] for k in ("dtype", "m", "fan_in", "fan_out", "rank")))
            points.setdefault(key, {})[row["method"]] = row
    return [payload["environment"] for payload in payloads], points


def ordered(points: dict, mode: str, dtype: str) -> list[tuple]:
    keys = [k for k in points if k[0] == mode and k[1] == dtype]
    return sorted(keys, key=lambda k: (k[3], k[4], k[5], k[2]))


def plot(points: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(k[0], k[1]) for k in points})
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 3.6 * len(panels)), squeeze=False)
    for ax, (mode, dtype) in zip(axes[:, 0], panels, strict=True):
        keys = ordered(points, mode, dtype)
        methods = sorted({m for k in keys for m in points[k]} - {"dense"})
        for method in methods:
            xs, ys = [], []
            for i, k in enumerate(keys):
                ratio = points[k].get(method, {}).get("ratio_to_dense")
                if ratio is not None:
                    xs.append(i)
                    ys.append(ratio)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=method)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(_target(mode), color="red", linestyle="--", linewidth=0.8, label="target")
        ax.set_yscale("log")
        ax.set_ylabel("time / dense")
        ax.set_title(f"{mode}, {dtype}")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{k[2]}×{k[3]}×{k[4]} r{k[5]}" for k in keys], rotation=90, fontsize=6)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def _err(row: dict) -> str:
    """The relative error, or "–" where none was measured (dropout draws unknown masks)."""
    value = row.get("rel_err")
    return "–" if value is None else f"{value:.1e}"


def _target(mode: str) -> float:
    """The time-ratio target of a panel: "train, dropout 0.1" is held to the training step's."""
    return TARGET[mode.split(",")[0]]


def _cell(row: dict | None, ratio: str = "ratio_to_dense") -> str:
    """The ratio, "skip" for a method that could not run, "–" for one not timed this way."""
    if row is None or ("skipped" not in row and ratio not in row):
        return "–"
    if ratio not in row:
        return "skip"
    return f"{row[ratio]:.2f}"


def graph_table(mode: str, dtype: str, keys: list[tuple], points: dict) -> list[str]:
    """Markdown lines: the CUDA-graph replay ratios of the points that have them (none: [])."""
    keys = [k for k in keys if "graph_p50_ms" in points[k].get("dense", {})]
    if not keys:
        return []
    columns = _columns(mode)
    lines = [f"### {mode}, {dtype}, CUDA-graph replays", "",
             "| M×in×out | r | dense ms | " + " | ".join(columns) + " |",
             "|" + "---|" * (len(columns) + 3)]  # fmt: skip
    for k in keys:
        rows = points[k]
        cells = " | ".join(_cell(rows.get(m), "graph_ratio_to_dense") for m in columns)
        lines.append(f"| {k[2]}×{k[3]}×{k[4]} | {k[5]} | {rows['dense']['graph_p50_ms']:.4f} "
                     f"| {cells} |")  # fmt: skip
    met = sum(points[k].get("ours", {}).get("graph_ratio_to_dense", float("inf")) <= _target(mode)
              for k in keys)  # fmt: skip
    return [*lines, "", f"Ours within {_target(mode):.2f}× dense at {met} of {len(keys)} points "
            "under CUDA graphs.", ""]  # fmt: skip


def _columns(mode: str) -> tuple[str, ...]:
    """The comparator columns of a table, with the variants: the expand in the epilogue (and
    from runs before it became the default, the expand first), and in the training step's
    also the one-pass backward."""
    variants = ("ours_expand_first", "ours_epilogue")
    if mode == "train":
        return (*COLUMNS, "ours_one_pass", *variants)
    return (*COLUMNS, *variants)


def _fastest_regime(rows: dict) -> str:
    """The fastest forced regime of a forward point, e.g. "persistent 1.03" (– if none ran)."""
    timed = {r: rows[f"ours_{r}"]["ratio_to_dense"] for r in REGIMES
             if "ratio_to_dense" in rows.get(f"ours_{r}", {})}  # fmt: skip
    if not timed:
        return "–"
    best = min(timed, key=timed.__getitem__)
    return f"{best} {timed[best]:.2f}"


def _run_line(env: dict) -> str:
    return (f"{env['device']} (torch {env['torch']}, triton {env['triton']}, CUDA "
            f"{env['cuda']}), {env['date']}: `{env['command']}`")  # fmt: skip


def table(envs: list[dict], points: dict) -> str:
    """Markdown: one table per (mode, dtype), then the target summary and skip reasons."""
    runs = "; ".join(_run_line(env) for env in envs)
    lines = [
        f"Measured on {runs} (a later run's rows replace an earlier's). Cells are p50 time "
        "÷ dense `F.linear` p50 (train: ÷ the dense frozen step, forward + dx); `err` is "
        "‖out − ref‖/‖ref‖ vs float64 for ours and for eager; `fastest regime` (forward) is "
        "the quickest of ours with each regime forced. The CUDA-graph tables time one replay "
        "of a graph holding the same calls: the GPU's work without the host's per-call cost "
        "(Python, dispatch, launches), which eager timings at small sizes mostly measure.",
        "",
    ]
    skips: dict[str, str] = {}
    for mode, dtype in sorted({(k[0], k[1]) for k in points}):
        keys = ordered(points, mode, dtype)
        lines += [f"### {mode}, {dtype}", ""]
        regimes = mode == "forward"
        columns = _columns(mode)
        head = "| M×in×out | r | dense ms | dense TFLOP/s | " + " | ".join(columns)
        head += " | err ours | err eager |" + (" fastest regime |" if regimes else "")
        lines += [head, "|" + "---|" * (len(columns) + 6 + regimes)]
        met = 0
        for k in keys:
            rows = points[k]
            dense = rows.get("dense", {})
            ours, eager = rows.get("ours", {}), rows.get("eager", {})
            met += ours.get("ratio_to_dense", float("inf")) <= _target(mode)
            cells = " | ".join(_cell(rows.get(m)) for m in columns)
            nan = float("nan")
            lines.append(
                f"| {k[2]}×{k[3]}×{k[4]} | {k[5]} | {dense.get('p50_ms', nan):.4f} | "
                f"{dense.get('tflops', nan):.0f} | {cells} | "
                f"{_err(ours)} | {_err(eager)} |"
                + (f" {_fastest_regime(rows)} |" if regimes else "")
            )
            for m, row in rows.items():
                if "skipped" in row:
                    skips.setdefault(m, row["skipped"])
        worst = max((points[k].get("ours", {}).get("ratio_to_dense", 0.0) for k in keys), default=0)
        lines += [
            "",
            f"Ours within {_target(mode):.2f}× dense at {met} of {len(keys)} points; "
            f"worst {worst:.2f}×.",
            "",
            *graph_table(mode, dtype, keys, points),
        ]
    for method, reason in sorted(skips.items()):
        lines.append(f"- `{method}` skipped (first reason): {reason}")
    return "\n".join(lines).rstrip() + "\n"


def write_docs(docs: Path, text: str) -> None:
    page = docs.read_text()
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{docs} lacks the markers {BEGIN} … {END}")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    docs.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}{END}", page))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, nargs="+", default=DEFAULT_JSONS,
                        help="result files to merge (default: results/lora_linear-cuda*.json)")
    parser.add_argument("--png", type=Path, default=None,
                        help="default: results/lora_linear-cuda.png")  # fmt: skip
    parser.add_argument("--docs", default=str(DEFAULT_DOCS), help="markdown page, or 'none'")
    args = parser.parse_args(argv)
    envs, points = load(*args.json)
    png = args.png or DEFAULT_PNG
    plot(points, png)
    text = table(envs, points)
    if args.docs == "none":
        print(text)
    else:
        write_docs(Path(args.docs), text)
    print(f"wrote {png}" + ("" if args.docs == "none" else f" and {args.docs}"))


if __name__ == "__main__":
    main()
