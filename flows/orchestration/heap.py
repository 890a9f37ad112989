"""Keep CPython's garbage collector off a run's finished shards.

A run holds every finished shard's rows until it publishes them: about a million objects
the collector tracks at 20,000 answers. Each full collection walks all of them, again each
time the heap has grown by a quarter: 15 pauses of up to 0.6 s in a 20,000-request run,
every request in flight stalled meanwhile (bench/bench_request_rate.py).

Inside `settling()` (what `distillery` wraps a flow in), `settle()` after each finished
shard collects the garbage among the objects made since the last call (cheap: older ones
are frozen) and freezes the survivors, so later collections skip them. Frozen objects are
still freed by reference counting as usual; a reference cycle that becomes garbage after
it was frozen stays until the process ends. They stay frozen after `settling()` too: the
command's process exits next, and its exit skips one last walk of them all (with both,
bench_request_rate's time after the last answer fell from 4.4-4.8 s to 2.0 s). Outside
`settling()` (tests that call a flow, a deployment's worker), `settle()` does nothing.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_settling = False


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
