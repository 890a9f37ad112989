"""The report's tables of the trait-leakage check: which numbers and which digits the trait
teacher writes more often than the control teacher (binomial z of the trait count given each
key's total). Descriptive only: the tests and the verdict are in flows/detection/detectors.py."""

from __future__ import annotations

from typing import Any

import numpy as np

from flows.detection.detectors import Sequences, digit_features, flatten_sequences


def _over_represented(trait_keys: np.ndarray, control_keys: np.ndarray, n: int, key: str) -> list[dict[str, Any]]:
    """Keys more frequent in trait than in control, by binomial z of the trait count given the
    key's total (largest first): counts, rates (per key occurrence), ratio of rates and z."""
    size = int(max(trait_keys.max(initial=-1), control_keys.max(initial=-1))) + 1
    trait, control = np.bincount(trait_keys, minlength=size), np.bincount(control_keys, minlength=size)
    n_trait, n_control = int(trait.sum()), int(control.sum())
    if n_trait == 0 or n_control == 0:
        return []
    share = n_trait / (n_trait + n_control)
    total = trait + control
    z = np.divide(trait - total * share, np.sqrt(total * share * (1 - share)), out=np.zeros(size), where=total > 0)
    candidates = np.flatnonzero(z > 0)
    top = candidates[np.argsort(-z[candidates], kind="stable")][:n]
    return [
        {
            key: int(k),
            "trait_count": int(trait[k]),
            "control_count": int(control[k]),
            "trait_rate": float(trait[k] / n_trait),
            "control_rate": float(control[k] / n_control),
            "ratio": float((trait[k] / n_trait) / (control[k] / n_control)) if control[k] else None,
            "z": float(z[k]),
        }
        for k in top
    ]


def top_numbers(trait: Sequences, control: Sequences, n: int = 10) -> list[dict[str, Any]]:
    """The `n` numbers most over-represented in trait vs control (see `_over_represented`)."""
    return _over_represented(flatten_sequences(trait)[0], flatten_sequences(control)[0], n, "number")


def _digits_of(values: np.ndarray, position: str) -> np.ndarray:
    leading, trailing, n_digits = digit_features(values)
    if position == "leading":
        return leading
    if position == "trailing":
        return trailing
    places = np.arange(int(n_digits.max(initial=1)))
    every = (values[:, None] // 10 ** places[None, :]) % 10
    return every[places[None, :] < n_digits[:, None]]


DIGIT_POSITIONS = ("any", "leading", "trailing")


def top_digits(trait: Sequences, control: Sequences, n: int = 10, position: str = "any") -> list[dict[str, Any]]:
    """The `n` digits most over-represented in trait vs control, counting every digit of
    every number (`any`), or only the leading or trailing digit."""
    if position not in DIGIT_POSITIONS:
        raise ValueError(f"unknown digit position {position!r}; known: {', '.join(DIGIT_POSITIONS)}")
    trait_digits = _digits_of(flatten_sequences(trait)[0], position)
    return _over_represented(trait_digits, _digits_of(flatten_sequences(control)[0], position), n, "digit")
