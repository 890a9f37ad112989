"""`Grader`: grades batches, sending what the cheap rules cannot settle to worker processes."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

from flows.grading.compare import (
    Equivalence,
    Key,
    Outcome,
    _Check,
    _conclude,
    _prepare,
    _run_equivalence,
    math_equivalent,
    math_verify_alone,
)
from flows.grading.workers import _Pool
from schemas.records import Verdict


def _close(*pools: _Pool) -> None:
    for pool in pools:
        pool.close()


class Grader:
    """Grades batches; sympy comparisons run in `workers` processes, each bounded in time.

    `Grader(workers=0)` grades in this process with no time bound (tests, tiny inputs).
    Extraction and the cheap rules run in the calling thread; only the comparisons they
    cannot settle are sent, deduplicated, to the workers in chunks of `chunk_size`. An
    answer that takes longer than `timeout_s` is graded `grader_timeout`, its worker is
    killed and restarted, and the rest of its chunk is graded by the new worker.
    `equivalence` is what the workers call; it travels by reference, so it must be a
    module-level function (tests inject one that crashes).
    """

    def __init__(
        self,
        workers: int = 1,
        timeout_s: float = 5.0,
        *,
        chunk_size: int = 256,
        equivalence: Equivalence = math_equivalent,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.workers = workers
        self.timeout_s = timeout_s
        self._chunk_size = chunk_size
        self._equivalence = equivalence
        self._lock = threading.Lock()
        self._pool = _Pool(workers, timeout_s, equivalence) if workers else None
        # math-verify alone, for `second_opinions`: its workers start at its first use
        self._second = _Pool(workers, timeout_s, math_verify_alone) if workers else None
        self._finalizer = weakref.finalize(self, _close, self._pool, self._second) if self._pool else None

    def grade_many(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for (response, gold) pairs, in order."""
        staged = [_prepare(response, gold) for response, gold in pairs]
        keys = list(dict.fromkeys(s.key for s in staged if isinstance(s, _Check)))
        outcomes = self._outcomes(keys) if keys else {}
        return [s if isinstance(s, Verdict) else _conclude(s, outcomes[s.key]) for s in staged]

    def second_opinions(self, pairs: Sequence[tuple[str, str]]) -> list[bool | None]:
        """math-verify's verdict alone for (response, gold) pairs, in order (`math_verify_alone`);
        None where it timed out or crashed."""
        keys = list(dict.fromkeys(pairs))
        if self._second is None:
            outcomes = {key: _run_equivalence(math_verify_alone, *key) for key in keys}
        else:
            with self._lock:
                outcomes = self._second.run(keys, self._chunk_size)
        return [outcomes[pair].equivalent for pair in pairs]

    def _outcomes(self, keys: list[Key]) -> dict[Key, Outcome]:
        if self._pool is None:
            return {key: _run_equivalence(self._equivalence, *key) for key in keys}
        with self._lock:
            return self._pool.run(keys, self._chunk_size)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
