"""``python -m tests.faults --repeat N [--only NAME ...]``: run every fault scenario N times on one long-lived swarm
(rebuilt when a failure leaves it unusable), record pass/fail and figures in ``docs/reliability.json`` and write
``docs/reliability.md``. Every process it starts is reaped at the end, also on Ctrl-C."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.faults import report
from tests.faults.bad_input import bad_inputs
from tests.faults.harness import Session
from tests.faults.scenarios import SCENARIOS
from tests.integration.conftest import write_small_corpus

ALL = [*SCENARIOS, "bad_inputs"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--repeat", type=int, default=20, help="repetitions of each scenario (default 20)")
    parser.add_argument("--only", action="append", choices=ALL, help="run only this scenario (repeatable)")
    parser.add_argument("--minutes", type=float, default=0, help="stop starting new cycles after this many minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = parser.parse_args(argv)
    names = args.only or ALL

    workdir = Path(tempfile.mkdtemp(prefix="bertswarm-faults-"))
    corpus = write_small_corpus(workdir / "corpus.txt")
    raw = {"machine": report.machine(), "repeat": args.repeat, "scenarios": names, "results": [], "minutes": 0.0}
    started = time.monotonic()
    session = None
    try:
        for cycle in range(args.repeat):
            if args.minutes and time.monotonic() - started > 60 * args.minutes:
                print(f"time budget of {args.minutes} min spent after {cycle} cycles", flush=True)
                break
            for name in names:
                if session is None:
                    session = Session(workdir / f"swarm{cycle}-{name}", corpus, random.Random(args.seed + cycle))
                    session.start()
                result = run_one(name, session, workdir / f"{name}-{cycle}")
                result["cycle"] = cycle
                raw["results"].append(result)
                status = "pass" if result["passed"] else "FAIL " + result["error"].splitlines()[0][:160]
                print(f"[{cycle + 1}/{args.repeat}] {name}: {status} {result['figures']} ({result['seconds']:.0f}s)",
                      flush=True)  # fmt: skip
                if not result["passed"]:
                    session = recover(session)
                raw["minutes"] = (time.monotonic() - started) / 60
                save(raw)
    except KeyboardInterrupt:
        print("interrupted: writing what ran", flush=True)
    finally:
        if session is not None:
            session.close()
        raw["minutes"] = (time.monotonic() - started) / 60
        save(raw)
        print(report.write(raw))
        if args.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r["passed"] for r in raw["results"]) else 1


def run_one(name: str, session: Session, scratch: Path) -> dict:
    began = time.monotonic()
    try:
        if name == "bad_inputs":
            figures = bad_inputs(session, scratch, session.swarm.corpus)
        else:
            if name != "late_joiner":  # the late joiner itself brings the swarm back to SIZE after a crash
                session.heal()
            figures = SCENARIOS[name](session)
        return {"scenario": name, "passed": True, "figures": figures, "error": "",
                "seconds": time.monotonic() - began}  # fmt: skip
    except Exception as e:
        error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        return {"scenario": name, "passed": False, "figures": {}, "error": error, "seconds": time.monotonic() - began}


def recover(session: Session) -> Session | None:
    """Heal the session after a failed repetition; if that fails too, drop it (the next scenario starts a new one)."""
    try:
        session.heal()
        return session
    except Exception as e:
        print(f"session could not heal ({type(e).__name__}: {str(e).splitlines()[0][:160]}); starting a new swarm",
              flush=True)  # fmt: skip
        session.close()
        return None


def save(raw: dict) -> None:
    report.RAW.write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
