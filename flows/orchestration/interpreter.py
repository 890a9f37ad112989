"""CPython set for a `distillery` command, whose event loops serve every request in flight.

The flow's loop and the request loop (flows/orchestration/request_loop.py) share the
interpreter with threads that import, grade, stitch and spool. Three things would stall
them, each measured with bench/bench_request_rate.py:

- **Full garbage collections.** A run holds every finished shard's rows until it publishes
  them: about a million objects the collector tracks at 20,000 answers. Each full collection
  walks all of them, again each time the heap has grown by a quarter: 15 pauses of up to
  0.6 s in a 20,000-request run, every request in flight stalled meanwhile. Inside
  `settling()`, `settle()` after each finished shard collects the garbage among the objects
  made since the last call (cheap: older ones are frozen) and freezes the survivors, so later
  collections skip them. Frozen objects are still freed by reference counting as usual; a
  reference cycle that becomes garbage after it was frozen stays until the process ends.
  They stay frozen after `settling()` too: the command's process exits next, and its exit
  skips one last walk of them all. Outside `settling()` (tests that call a flow, a
  deployment's worker), `settle()` does nothing.
- **Collections while the command imports.** Prefect and the publishing stack (`datasets`)
  make ~200,000 objects that live as long as the process, imported while the first requests
  are out (flows/orchestration/head_start.py): four full collections of ~0.25 s in all, then
  a first `settle()` that walked them all once more (120-180 ms). `importing()` holds
  collections off while they load and freezes what they made (no walk: freezing moves the
  collector's lists whole).
- **The interpreter lock's switch interval.** A thread running Python keeps the lock for up
  to `sys.getswitchinterval()` (5 ms) after a loop asks for it, each time a response wakes
  the request loop. `switching_often()` makes that 1 ms for the command's run.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator

SWITCH_INTERVAL_S = 0.001  # CPython's default is 0.005

_settling = False


@contextlib.contextmanager
def switching_often() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """No collection while the command imports; then what exists is frozen (a few garbage
    cycles among it too, kept until the process ends)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def settling() -> Iterator[None]:
    global _settling
    _settling = True
    try:
        yield
    finally:
        _settling = False


def settle() -> None:
    """A shard is finished: collect what its work left as garbage, freeze what it keeps."""
    if _settling:
        gc.collect()
        gc.freeze()
