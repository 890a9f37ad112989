"""A fault drill on 1,000 problems: faulty teachers (429 + Retry-After, 500, timeouts and
slow answers, seeded), a `distillery run` killed with kill -9 at a random moment and rerun
until it completes. bench/bench_faults.py prints the same drill's figures, any size or seed."""

from __future__ import annotations

import pytest
from fault_helpers import drill, drill_env

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_killed_and_faulted_run_equals_an_undisturbed_one_and_resends_nothing_journaled(tmp_path):
    result = drill(tmp_path, problems=1000, seed=1, env=drill_env(), shard_size=100)
    assert result.killed, "the run ended before it could be killed"
    assert result.rerun_codes[-1] == 0, (tmp_path / "faulty.log").read_text()[-3000:]
    assert all(result.faults[kind] for kind in ("429", "500", "timeout", "slow")), result.faults
    assert result.differences == {"composites": 0, "trajectories": 0, "rejected": 0}, result.report()
    assert result.duplicates == {"composites": 0, "trajectories": 0, "rejected": 0}
    assert result.rows == {"composites": 750, "trajectories": 2000, "rejected": 250}
    # an answer the journal held when the run died is never asked for again; only the window
    # (answered by the server, not yet journaled when the process died) may be
    assert result.journaled_at_kill > 0 and result.resent_journaled == 0, result.report()
    assert result.resent_window <= result.window
