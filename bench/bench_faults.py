"""A fault drill under load: 1,000 problems, faulty teachers, a kill -9, reruns.

    .venv/bin/python bench/bench_faults.py [--problems 1000] [--seed 1] [--shard-size 100]

Both teachers sit on one loopback fake server that answers, at random with the seed, 429
with `Retry-After: 1` (4%), 500 (4%), nothing until the client's 2 s timeout (2%), or
slowly (0.2-0.8 s, 10%). A `distillery run` is killed with SIGKILL at a random moment
(after a random number of answers, then up to 0.2 s more) and rerun until it completes.
Prints the drill's figures (tests/fault_helpers.py): whether the datasets equal an
undisturbed run's row for row (`differences`, order aside), duplicated rows, and of the
requests the server answered before the kill, how many the journal held, how many it did
not (the window: answered, but the process died before journaling them) and how many of
each a later run sent again (`resent_journaled` must be 0). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fault_helpers import drill, drill_env  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        result = drill(Path(tmp), args.problems, args.seed, drill_env(), args.shard_size, args.concurrency)
    print(result.report())
    ok = (result.killed and result.rerun_codes[-1] == 0 and not any(result.differences.values())
          and not any(result.duplicates.values()) and result.resent_journaled == 0)
    print(f"undisturbed run {result.undisturbed_s} s; disturbed (killed + {result.reruns} rerun(s)) "
          f"{result.disturbed_s} s; killed after {result.killed_after_answers} answers: "
          f"{result.journaled_at_kill} journaled of {result.answered_before_kill} answered, window "
          f"{result.window} ({result.resent_window} sent again), journaled and sent again "
          f"{result.resent_journaled}; datasets {'equal' if not any(result.differences.values()) else 'DIFFER'}, "
          f"duplicates {sum(result.duplicates.values())}: {'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
