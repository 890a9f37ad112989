"""heap.settle(): the garbage a finished shard left is collected, what it keeps is frozen."""

from __future__ import annotations

import gc
import weakref

from flows.orchestration import heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_settle_collects_the_shards_garbage_and_freezes_what_it_keeps():
    gc.disable()  # no automatic collection in between: only settle() collects here
    try:
        before = gc.get_freeze_count()  # a `distillery` command run earlier in this process leaves its objects frozen
        kept, dropped = Node(), Node()
        gone = weakref.ref(dropped)
        del dropped
        heap.settle()  # outside settling(): nothing happens
        assert gone() is not None and gc.get_freeze_count() == before

        with heap.settling():
            heap.settle()
            assert gone() is None  # the cycle dropped before settling was collected, not frozen
            frozen = gc.get_freeze_count()
            assert frozen > before and gc.is_tracked(kept)
            later = Node()
            heap.settle()
            assert gc.get_freeze_count() > frozen and gc.is_tracked(later)
            frozen = gc.get_freeze_count()
        Node()
        heap.settle()  # settling() has ended: nothing more is frozen
        assert gc.get_freeze_count() <= frozen  # (frozen objects freed by reference counting leave it)
    finally:
        gc.unfreeze()
        gc.enable()
