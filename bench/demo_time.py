"""Wall-clock time and peak memory of ``bash demo.sh`` from an empty state, against the goal (<= 5 min, <= 4 GB).

Runs the demo with its own empty output and translation folders and, unless ``--keep_cache``, an empty model cache
(so the first-use conversion of me5-small is included), then writes a JSON file and prints a markdown table with
the time of every sweep job (from the sweep's "done in N s" lines) and the results tables the demo wrote.

    python bench/demo_time.py                       # -> bench/results/demo_time.json (+ the demo's outputs beside)

Peak memory is the largest resident set of any process of the demo (they run one at a time), as
``/usr/bin/time -v`` reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_S, GOAL_GB = 300, 4.0
DONE = re.compile(r"done in (\d+) s: (.+)$")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=str(REPO / "bench" / "results" / "demo"),
                   help="emptied, then holds the demo's checkpoints/, translations/, model cache and log")
    p.add_argument("--keep_cache", action="store_true", help="use the usual model cache (skip the conversion)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "demo_time.json"))
    args = p.parse_args(argv)

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT_DIR": str(work / "checkpoints"),
           "TRANSLATIONS": str(work / "translations")}
    if not args.keep_cache:
        env["FLARE_CACHE"] = str(work / "cache")
    t0 = time.perf_counter()
    with open(work / "demo.log", "w") as log:
        proc = subprocess.run(["bash", str(REPO / "demo.sh")], env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    jobs = [{"job": m.group(2), "seconds": int(m.group(1))}
            for line in (work / "demo.log").read_text().splitlines() if (m := DONE.search(line))]
    tables = "\n".join(f.read_text() for f in sorted((work / "checkpoints" / "report").glob("*.md")))
    result = {"exit_code": proc.returncode, "wall_s": round(wall, 1), "peak_rss_gb": round(peak_gb, 2),
              "goal_met": proc.returncode == 0 and wall <= GOAL_S and peak_gb <= GOAL_GB,
              "model_conversion_included": not args.keep_cache, "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "jobs": jobs, "tables": tables}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"demo.sh: exit {proc.returncode}, {int(wall // 60)} min {int(wall % 60):02d} s, peak {peak_gb:.2f} GB "
          f"(goal <= {GOAL_S // 60} min, <= {GOAL_GB:.0f} GB: {'met' if result['goal_met'] else 'NOT met'}), "
          f"{os.cpu_count()} CPUs, conversion {'included' if not args.keep_cache else 'skipped'}")
    print("\n| job | seconds |\n|---|---|")
    for j in jobs:
        print(f"| {j['job']} | {j['seconds']} |")
    print("\n" + tables)
    print(f"wrote {out}; log and outputs in {work}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
