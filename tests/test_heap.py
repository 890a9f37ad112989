"""heap.settle(): the garbage a finished shard left is collected, what it keeps is frozen."""

from __future__ import annotations

import gc
import weakref

from flows.orchestration import heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def frozen(obj) -> bool:
    """Frozen: still tracked, but in none of the collector's generations (the permanent one).
    The freeze count alone cannot tell: frozen objects freed by reference counting leave it."""
    return gc.is_tracked(obj) and not any(tracked is obj for tracked in gc.get_objects())


def test_settle_collects_the_shards_garbage_and_freezes_what_it_keeps():
    gc.disable()  # no automatic collection in between: only settle() collects here
    try:
        kept, dropped = Node(), Node()
        gone = weakref.ref(dropped)
        del dropped
        heap.settle()  # outside settling(): nothing happens
        assert gone() is not None and not frozen(kept)

        with heap.settling():
            heap.settle()
            assert gone() is None  # the cycle dropped before settling was collected, not frozen
            assert frozen(kept)
            later = Node()
            heap.settle()
            assert frozen(later)
        after = Node()
        heap.settle()  # settling() has ended: nothing more is frozen
        assert not frozen(after)
    finally:
        gc.unfreeze()
        gc.enable()
