"""The run's spending caps (`budget:` in the recipe): tokens, money, requests.

A cap counts everything this output folder's requests have cost, over every run: on start
the journal's answers are summed (`spent_in_journal`), and each client adds what it gets
back. Before a request is sent `admit()` checks the caps; once one is reached, no new
request goes out (`BudgetReached`), the requests already in flight finish and are
journaled, and the run stops naming the cap. A rerun with a larger cap continues from the
journal, so no request is sent twice.

Tokens are known only when an answer arrives, so the token and cost caps can be passed by
the requests already admitted when they were reached (those in flight and those queued for
a slot: at most twice each role's concurrency, × a request's tokens); the request cap is exact.

Shards on Dask or Ray workers each have a `Budget` of their own (built where the shard runs).
There `watch_others()` makes it read, every half second (less often for a big journal) and
in a thread, what the journal folder they share says has been spent, and count that when it is more than it knows: shards
running at once see each other's answers, and can pass a cap only by what is sent within one
refresh (at most every worker's requests in that time), not by a whole remainder each.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flows.models.journal_usage import usage_by_shard
from schemas.recipe import BudgetSpec, Price, TeacherSpec


class BudgetReached(RuntimeError):
    """A cap of `budget:` is reached; what was answered is journaled."""


def cost_of(prompt_tokens: int, completion_tokens: int, price: Price | None) -> float:
    if price is None:
        return 0.0
    return (prompt_tokens * price.prompt_per_mtok + completion_tokens * price.completion_per_mtok) / 1e6


def effective_price(spec: TeacherSpec) -> Price | None:
    """The role's price as billed: with `mode: batch`, the batch discount applied."""
    if spec.price is None or spec.mode != "batch":
        return spec.price
    factor = spec.price.batch_discount
    return spec.price.model_copy(update={"prompt_per_mtok": spec.price.prompt_per_mtok * factor,
                                         "completion_per_mtok": spec.price.completion_per_mtok * factor})


@dataclass
class Budget:
    caps: BudgetSpec
    tokens: int = 0
    cost: float = 0.0
    requests: int = 0
    stopped: str | None = None  # the cap that refused a request, once one did
    journal_dir: Path | None = None  # what `watch_others` reads, with the roles' prices
    prices: Mapping[str, Price | None] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _watch_every_s: float | None = None
    _watched_at: float = 0.0
    _watching: bool = False
    _admitted: int = 0  # by this Budget: requests let through, and those that got their answer
    _answered: int = 0

    def reached(self) -> str | None:
        """Which cap is reached, as the message says it, or None."""
        caps = self.caps
        if caps.requests is not None and self.requests >= caps.requests:
            return f"budget.requests: {self.requests:,} of {caps.requests:,} requests"
        if caps.tokens is not None and self.tokens >= caps.tokens:
            return f"budget.tokens: {self.tokens:,} of {caps.tokens:,} tokens"
        if caps.cost is not None and self.cost >= caps.cost:
            return f"budget.cost: {self.cost:.4f} of {caps.cost:.4f}"
        return None

    def admit(self) -> None:
        """Count one more request, or raise `BudgetReached` when a cap is reached."""
        self._look_at_others()
        with self._lock:
            if (cap := self.reached()) is not None:
                self.stopped = self.stopped or f"{cap} spent"  # the first refusal's figures
                raise self.stop()
            self.requests += 1
            self._admitted += 1

    def stop(self) -> BudgetReached:
        """What a run raises once a request was refused (`stopped` is set)."""
        return BudgetReached(f"{self.stopped}: no new request was sent; everything answered is journaled. "
                             "Raise the cap in the recipe and run it again to continue.")

    def spend(self, prompt_tokens: int, completion_tokens: int, price: Price | None) -> None:
        """An admitted request's answer (already journaled): its tokens and cost."""
        with self._lock:
            self.tokens += prompt_tokens + completion_tokens
            self.cost += cost_of(prompt_tokens, completion_tokens, price)
            self._answered += 1

    def watch_others(self, every_s: float = 0.5) -> None:
        """Count what other processes journal in the same folder too (see the module's docstring):
        read it every `every_s`, or every 10× what a read takes when that is longer (a big
        journal: the reads stay a tenth of one thread's time)."""
        self._watch_every_s, self._watched_at = every_s, time.monotonic()  # the journal was read just now

    def refresh(self) -> None:
        """Read what the journal says has been spent, and take each figure where it is more
        than this Budget's own: the answers of others. Requests admitted here and not yet
        answered count on top of the journal's answers."""
        if self.journal_dir is None:
            return
        tokens, cost, answers = spent_in_journal(self.journal_dir, self.prices)
        with self._lock:
            self.tokens = max(self.tokens, tokens)
            self.cost = max(self.cost, cost)
            self.requests = max(self.requests, answers + self._admitted - self._answered)

    def _look_at_others(self) -> None:
        """With `watch_others`, a `refresh` in a thread once `every_s` has passed (never on the
        caller's event loop: at a million answers the read takes ~0.4 s)."""
        if self._watch_every_s is None:
            return
        with self._lock:
            now = time.monotonic()
            if self._watching or now - self._watched_at < self._watch_every_s:
                return
            self._watching, self._watched_at = True, now

        def refresh_then_rest() -> None:
            started = time.monotonic()
            try:
                self.refresh()
            finally:
                took = time.monotonic() - started
                self._watched_at = started + max(0.0, 10 * took - (self._watch_every_s or 0.0))
                self._watching = False

        threading.Thread(target=refresh_then_rest, name="budget-refresh", daemon=True).start()

    def figures(self) -> dict[str, float]:
        return {"tokens": self.tokens, "cost": round(self.cost, 6), "requests": self.requests}


def spent_in_journal(journal_dir: Path, prices: Mapping[str, Price | None]) -> tuple[int, float, int]:
    """Tokens, cost and answers already in the journal (every answer line, `Usage`). A journal
    file belongs to the role its name starts with (`tool-shard-00003`, `trait-00001`,
    `student-r2-shard-00000`); a role without a price costs nothing. Each file's figures come
    from its index where it is current (a million answers: a fraction of a second, not a 25 s
    read); the lines it does not cover are read."""
    tokens, cost, answers = 0, 0.0, 0
    for shard, usage in usage_by_shard(journal_dir).items():
        price = next((p for role, p in prices.items() if shard.startswith(f"{role}-")), None)
        tokens += usage.prompt_tokens + usage.completion_tokens
        cost += cost_of(usage.prompt_tokens, usage.completion_tokens, price)
        answers += usage.answers
    return tokens, cost, answers


def run_budget(caps: BudgetSpec, journal_dir: Path, roles: Iterable[tuple[str, TeacherSpec]]) -> Budget | None:
    """The run's budget with what the journal already holds counted, or None without caps."""
    if caps.tokens is None and caps.cost is None and caps.requests is None:
        return None
    prices = {role: effective_price(spec) for role, spec in roles}
    tokens, cost, answers = spent_in_journal(journal_dir, prices)
    return Budget(caps, tokens=tokens, cost=cost, requests=answers, journal_dir=journal_dir, prices=prices)
