"""How sure a model was of a sample, from its token log-probabilities (the DeepConf idea).

Two numbers per sample: the mean log-probability of its tokens, and the lowest mean over
any `WINDOW` consecutive tokens (a stretch where the model was lost drags it down even in
a long, otherwise confident answer). Only these summaries are journaled, never the
per-token values. A multi-turn sample (code, output, more code) combines its turns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

WINDOW = 32  # tokens


@dataclass(frozen=True)
class Confidence:
    tokens: int
    mean_logprob: float
    lowest_window: float  # lowest mean log-probability over WINDOW consecutive tokens

    def to_json(self) -> dict[str, float]:
        return {"tokens": self.tokens, "mean_logprob": self.mean_logprob, "lowest_window": self.lowest_window}


def confidence_of(logprobs: Sequence[float], window: int = WINDOW) -> Confidence | None:
    """The summary of one response's token log-probabilities (None when there are none)."""
    if not logprobs:
        return None
    size = min(window, len(logprobs))
    total = running = sum(logprobs[:size])
    lowest = running
    for i in range(size, len(logprobs)):
        running += logprobs[i] - logprobs[i - size]
        lowest = min(lowest, running)
        total += logprobs[i]
    return Confidence(len(logprobs), round(total / len(logprobs), 6), round(lowest / size, 6))


def combine(parts: Iterable[Confidence | None]) -> Confidence | None:
    """One sample's confidence from its turns: token-weighted mean, lowest of the windows."""
    known = [p for p in parts if p is not None]
    if not known:
        return None
    tokens = sum(p.tokens for p in known)
    mean = sum(p.mean_logprob * p.tokens for p in known) / tokens
    return Confidence(tokens, round(mean, 6), min(p.lowest_window for p in known))


def confidence_fields(confidence: Confidence | None) -> dict[str, float | None]:
    """The trajectory fields a sample's confidence fills."""
    if confidence is None:
        return {"confidence": None, "lowest_window": None}
    return {"confidence": confidence.mean_logprob, "lowest_window": confidence.lowest_window}
