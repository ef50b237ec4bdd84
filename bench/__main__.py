"""``python -m bench [--only NAME ...] [--reps N] [--quick] [--report-only]``: run the scenarios, write
``bench/results/<scenario>.json`` and regenerate ``docs/performance.md``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import report
from bench.common import RESULTS, LoadSampler, machine_facts
from bench.scenarios import NAMES, load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", nargs="+", choices=NAMES, help="run only these scenarios")
    p.add_argument("--reps", type=int, default=3, help="repetitions per arm (median and spread are reported)")
    p.add_argument("--quick", action="store_true", help="smoke run: smaller/shorter arms, results not for docs")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON results go")
    p.add_argument("--doc", type=Path, default=report.DOC, help="the generated report")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from existing results")
    args = p.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every scenario's finally-blocks stop their worker groups
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    if args.quick and args.results == RESULTS:
        args.results = Path(tempfile.gettempdir()) / "bertswarm-bench-quick"
        print(f"--quick: results go to {args.results} (bench/results/ keeps the last full run)", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.report_only:
        facts = machine_facts()
        for name in args.only or NAMES:
            failed += [name] if not run_one(name, args, facts) else []
    if not args.quick or args.doc != report.DOC:
        report.write(args.results, args.doc)
        print(f"wrote {args.doc}", flush=True)
    if failed:
        print(f"failed scenarios: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run_one(name: str, args, facts: dict) -> bool:
    module = load(name)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    print(f"== {module.TITLE} (reps={args.reps}{', quick' if args.quick else ''})", flush=True)
    started, ok = time.time(), True
    with LoadSampler() as load_avg:
        try:
            result = module.run(workdir, args.reps, args.quick)
        except Exception:
            ok = False
            result = {"error": traceback.format_exc(), "rows": [], "notes": []}
            print(result["error"], file=sys.stderr, flush=True)
    result.update(
        scenario=name,
        title=module.TITLE,
        reps=args.reps,
        quick=args.quick,
        machine=facts,
        duration_s=time.time() - started,
        loadavg_1m=load_avg.summary(),
        finished=time.time(),
    )
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    print(report.scenario_text(result), flush=True)
    if ok and not os.environ.get("BENCH_KEEP_WORKDIR"):
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"worker logs kept in {workdir}", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
