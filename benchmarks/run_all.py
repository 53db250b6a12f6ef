"""``make bench``: run every benchmark, print its table, and write the tables to one markdown file.

Each benchmark module exposes ``run(out_dir: Path) -> list[dict]``; this script only gathers and formats, so a
benchmark can also be run alone (``python benchmarks/bench_extract.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from features.quiet import quiet_terminal

BENCHMARKS = {
    "extract": "Feature extraction throughput (full pipeline vs reading alone vs encoder alone)",
    "mil": "MIL training throughput and peak memory when streaming bags",
    "finetune": "Encoder fine-tuning on the mined selection vs on all patches",
    "loop": "One refresh of the mining loop vs round 0, over synthetic cohort seeds",
    "heads": "Patch-level heads on stored embeddings vs end-to-end fine-tuning",
    "viewer": "`mil view` tile serving: cold and cached 224 px tiles, tiles/s with 8 concurrent clients",
    "scale": "Cost of a round's MIL, scoring and mining stages as the cohort grows, extrapolated to Camelyon16",
}


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def load(name: str):
    path = Path(__file__).parent / f"bench_{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    sys.argv[1:] = quiet_terminal(sys.argv[1:])  # the commands' quiet terminal (--verbose shows library chatter)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sections = [f"Measured on: {machine()}, {time.strftime('%Y-%m-%d')}", ""]
    for name in args.only:
        print(f"\n== {name}: {BENCHMARKS[name]}", flush=True)
        started = time.perf_counter()
        rows = load(name).run(args.out / name)
        table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g")
        print(table, flush=True)
        sections += [f"## {BENCHMARKS[name]}", "", table, "",
                     f"(benchmark wall time {time.perf_counter() - started:.0f} s)", ""]
    report = args.out / "benchmarks.md"
    report.write_text("\n".join(sections))
    print(f"\nwrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
