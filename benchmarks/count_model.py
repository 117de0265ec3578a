"""What a whole-model parameter report costs: the Stable Diffusion v1 UNet built on the meta
device (no weights allocated) and counted with rank-8 adapters on every `to_q` / `to_v`.

Each step is timed in a fresh Python process, so that the first build (which imports
diffusers' model submodules) and `import diffusers` itself are measured as a user meets
them; the later builds and `count_model` are the median of `--repeats` calls.

    python benchmarks/count_model.py      # writes results/count_model-cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from harness import SD_V1_UNET, write_results

CHILD = """
import json, statistics, sys, time
start = time.perf_counter()
import diffusers
imported = time.perf_counter() - start
import torch
from lowrank.report import count_model
config, repeats = json.loads(sys.argv[1]), int(sys.argv[2])

def build():
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**config)

start = time.perf_counter()
unet = build()
first = time.perf_counter() - start
builds, counts = [], []
for _ in range(repeats):
    start = time.perf_counter()
    unet = build()
    builds.append(time.perf_counter() - start)
    start = time.perf_counter()
    counted = count_model(unet, ["to_q", "to_v"], rank=8)
    counts.append(time.perf_counter() - start)
print(json.dumps({
    "import_diffusers_s": imported, "first_build_s": first,
    "build_s": statistics.median(builds), "count_model_s": statistics.median(counts),
    "added": counted.adapter_params,
}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="builds and counts per process")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes to run")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.processes < 1:
        parser.error(f"--repeats and --processes must be at least 1, got {args.repeats}, "
                     f"{args.processes}")
    rows = []
    for index in range(args.processes):
        command = [sys.executable, "-c", CHILD, json.dumps(SD_V1_UNET), str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append({"process": index, **json.loads(done.stdout.splitlines()[-1])})
        print(rows[-1])
    print(write_results("count_model", rows, {"config": SD_V1_UNET, "model": "SD v1 UNet"}))


if __name__ == "__main__":
    main()
