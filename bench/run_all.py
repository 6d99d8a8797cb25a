#!/usr/bin/env python3
"""Every benchmark of the project in one run, one after the other, and a summary of their targets.

Run from the project root with the project's venv:

    .venv/bin/python bench/run_all.py [--quick] [--only NAME ...]

Each benchmark is its own script (see bench/README.md) and measures its ratios side by side inside its own
run; this runner starts them in turn on the same machine, keeps each one's full output in
``run/bench/<name>.log``, and prints every line that states a target (``TARGET MET`` / ``TARGET MISSED``),
so the existing targets and the new ones are read off one run. ``--quick`` passes each script its smaller
settings (a smoke run, not figures to quote). The exit code is 0 when every script ran to its end, whatever
the figures (a measurement, not a test).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> (script, arguments for --quick)
BENCHES: dict[str, tuple[str, list[str]]] = {
    "enrolment": ("bench_enrolment.py", ["--seconds", "2", "--rounds", "2", "--warmup", "1"]),
    "acme": ("bench_acme.py", ["--aes", "10", "--rounds", "2", "--retrieves", "100", "--steady-rounds", "2"]),
    "attack": ("bench_attack.py", ["--rounds", "1", "--seconds", "6"]),
    "flood": ("bench_flood.py", ["--handshakes", "2000"]),
    "revocation": ("bench_revocation.py", ["--rounds", "2"]),
    "hygiene": ("bench_mef_hygiene.py", ["--enrolments", "200"]),
    "rules": ("bench_rules_scale.py", ["--big", "2000", "--small", "100", "--aes", "10", "--rounds", "2"]),
    "scale": ("bench_scale.py", ["--big", "20000", "--small", "500", "--seconds", "2", "--rounds", "1",
                                 "--fetches", "600"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller settings: a smoke run")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these benchmarks")
    args = ap.parse_args()
    out_dir = Path.cwd() / "run" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: list[str] = []
    failed: list[str] = []
    for name, (script, quick) in BENCHES.items():
        if args.only and name not in args.only:
            continue
        log_path = out_dir / f"{name}.log"
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else [])]
        print(f"== {name}: {' '.join(cmd[1:])} (output in {log_path})", flush=True)
        t0 = time.monotonic()
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if "TARGET" in line:
                    print("   " + line.rstrip(), flush=True)
                    summary.append(f"{name}: {line.strip()}")
            rc = proc.wait()
        print(f"   ({time.monotonic() - t0:.0f} s, exit {rc})", flush=True)
        if rc != 0:
            failed.append(f"{name} (exit {rc}, see {log_path})")
    print("\nSUMMARY of every target in this run")
    for line in summary:
        print("  " + line)
    if failed:
        print("did not run to the end: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
