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
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flows.models.journal import usage_by_shard
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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
        with self._lock:
            if (cap := self.reached()) is not None:
                self.stopped = self.stopped or f"{cap} spent"  # the first refusal's figures
                raise self.stop()
            self.requests += 1

    def stop(self) -> BudgetReached:
        """What a run raises once a request was refused (`stopped` is set)."""
        return BudgetReached(f"{self.stopped}: no new request was sent; everything answered is journaled. "
                             "Raise the cap in the recipe and run it again to continue.")

    def spend(self, prompt_tokens: int, completion_tokens: int, price: Price | None) -> None:
        with self._lock:
            self.tokens += prompt_tokens + completion_tokens
            self.cost += cost_of(prompt_tokens, completion_tokens, price)

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
    tokens, cost, answers = spent_in_journal(journal_dir, {role: effective_price(spec) for role, spec in roles})
    return Budget(caps, tokens=tokens, cost=cost, requests=answers)
