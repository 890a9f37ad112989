"""The interpreter set for a command: garbage collections kept off the loop's way, the switch interval."""

from __future__ import annotations

import gc
import sys
import weakref

import pytest

from flows.orchestration import interpreter


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
        interpreter.settle()  # outside settling(): nothing happens
        assert gone() is not None and not frozen(kept)

        with interpreter.settling():
            interpreter.settle()
            assert gone() is None  # the cycle dropped before settling was collected, not frozen
            assert frozen(kept)
            later = Node()
            interpreter.settle()
            assert frozen(later)
        after = Node()
        interpreter.settle()  # settling() has ended: nothing more is frozen
        assert not frozen(after)
    finally:
        gc.unfreeze()
        gc.enable()


def test_importing_collects_nothing_then_freezes_what_it_made():
    gc.unfreeze()
    try:
        with interpreter.importing():
            assert not gc.isenabled()
            imported = Node()
        assert gc.isenabled() and frozen(imported)
    finally:
        gc.unfreeze()


def test_importing_leaves_the_collector_as_it_found_it_after_a_failure():
    gc.disable()
    try:
        with pytest.raises(ImportError), interpreter.importing():
            raise ImportError("no such module")
        assert not gc.isenabled()  # was off before: stays off
    finally:
        gc.unfreeze()
        gc.enable()
    with pytest.raises(ImportError), interpreter.importing():
        raise ImportError("no such module")
    gc.unfreeze()
    assert gc.isenabled()


def test_switching_often_for_the_run_only():
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError), interpreter.switching_often():
        assert sys.getswitchinterval() == interpreter.SWITCH_INTERVAL_S < before
        raise RuntimeError("the flow failed")
    assert sys.getswitchinterval() == before
