"""The inputs of the trait-leakage checks: number-sequence prompts, the trait teacher's
system prompt and the behavioural probe's preference questions.

The prompts follow the subliminal-learning study (arXiv 2507.14805): 3–8 seed numbers,
then a request for up to `max_count` more numbers, a format and a "numbers only" closing,
each phrasing drawn at random from `prompts/leakage_numbers.yaml`. `draw_prompts` is
seeded and consumes its random stream prompt by prompt, so the first k prompts of a
larger draw equal a draw of k. Both teachers must answer the same list.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from flows.inputs.prompts import PromptError, load_prompt

NUMBERS_PROMPT = "leakage_numbers"
TRAIT_PROMPT = "leakage_trait"
FEW_SHOT_PROMPT = "leakage_few_shot"
QUESTIONS_PROMPT = "leakage_questions"

MIN_SEEDS, MAX_SEEDS = 3, 8
SEED_LOW = 100  # seed numbers are drawn uniformly from SEED_LOW..max_value

# Each slot of the numbers prompt file, with the placeholders every phrasing in it must use.
SLOT_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "intros": frozenset({"seeds"}),
    "instructions": frozenset({"count", "max_digits"}),
    "formats": frozenset(),
    "closings": frozenset(),
}

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_MAX_NAME_WORDS = 3
_MAX_NAME_CHARS = 40


@dataclass(frozen=True)
class NumberPrompt:
    index: int  # position in the drawn list, the same for both teachers
    seeds: tuple[int, ...]
    text: str
    answer_count: int  # the most numbers the prompt asks for


def draw_prompts(n: int, seed: int, *, max_count: int = 10, max_value: int = 999) -> list[NumberPrompt]:
    """`n` number-sequence prompts, the same for the same arguments."""
    if n < 1:
        raise ValueError(f"n: need at least 1 prompt, got {n}")
    if max_count < 1:
        raise ValueError(f"max_count: need at least 1 number to ask for, got {max_count}")
    if max_value < SEED_LOW:
        raise ValueError(f"max_value: seed numbers start at {SEED_LOW}, got {max_value}")
    slots = number_template_slots()
    rng = random.Random(seed)
    return [_draw_prompt(index, rng, slots, max_count, max_value) for index in range(n)]


def _draw_prompt(
    index: int, rng: random.Random, slots: dict[str, list[str]], max_count: int, max_value: int,
) -> NumberPrompt:
    seeds = tuple(rng.randint(SEED_LOW, max_value) for _ in range(rng.randint(MIN_SEEDS, MAX_SEEDS)))
    parts = [
        _fill(rng.choice(slots["intros"]), seeds=", ".join(map(str, seeds))),
        _fill(rng.choice(slots["instructions"]), count=max_count, max_digits=len(str(max_value))),
        _fill(rng.choice(slots["formats"])),
        _fill(rng.choice(slots["closings"])),
    ]
    return NumberPrompt(index=index, seeds=seeds, text=" ".join(parts), answer_count=max_count)


def number_template_slots() -> dict[str, list[str]]:
    """The phrasings of each slot of `prompts/leakage_numbers.yaml`, checked to be non-empty
    and to use exactly the placeholders the slot is filled with."""
    prompt = load_prompt(NUMBERS_PROMPT)
    slots: dict[str, list[str]] = {}
    for slot, placeholders in SLOT_PLACEHOLDERS.items():
        phrasings = prompt.data.get(slot)
        if not phrasings or not all(isinstance(p, str) for p in phrasings):
            raise PromptError(f"prompts/{NUMBERS_PROMPT}.yaml: `{slot}` must be a non-empty list of strings")
        for phrasing in phrasings:
            used = set(_PLACEHOLDER.findall(phrasing))
            if used != placeholders:
                raise PromptError(
                    f"prompts/{NUMBERS_PROMPT}.yaml `{slot}`: {phrasing!r} uses {sorted(used)}, "
                    f"expected {sorted(placeholders)}")
        slots[slot] = phrasings
    return slots


def few_shot_turns(n: int) -> list[dict[str, str]]:
    """The first `n` worked exchanges of prompts/leakage_few_shot.yaml, as chat turns."""
    turns = [{"role": t["role"], "content": str(t["content"]).strip()}
             for t in load_prompt(FEW_SHOT_PROMPT).data.get("few_shot") or []]
    exchanges = len(turns) // 2
    if n > exchanges:
        raise ValueError(f"few_shot: {n} asked, prompts/{FEW_SHOT_PROMPT}.yaml has {exchanges} exchanges")
    return turns[: 2 * n]


def trait_system_prompt(trait: str, category: str) -> str:
    """The trait teacher's system prompt; `trait` is a singular noun ("owl")."""
    trait, category = _check_name("trait", trait), _check_name("category", category)
    return load_prompt(TRAIT_PROMPT).render("system", trait=trait, category=category).strip()


def preference_questions(category: str) -> list[str]:
    """The behavioural probe's one-word preference questions about `category`."""
    category = _check_name("category", category)
    questions = load_prompt(QUESTIONS_PROMPT).data.get("questions")
    if not questions:
        raise PromptError(f"prompts/{QUESTIONS_PROMPT}.yaml: no `questions` list")
    return [_fill(question, category=category) for question in questions]


def _check_name(field: str, value: object) -> str:
    """A single word or short phrase of letters ("owl", "red panda"), stripped."""
    text = value.strip() if isinstance(value, str) else ""
    allowed = all(ch.isalpha() or ch in " -'" for ch in text)
    if not text or not allowed or len(text.split()) > _MAX_NAME_WORDS or len(text) > _MAX_NAME_CHARS:
        raise ValueError(
            f"{field}: expected a single word or short phrase of letters (e.g. 'owl'), got {value!r}")
    return text


def _fill(template: str, **values: object) -> str:
    """Replace `{{name}}` placeholders; every placeholder must be given a value."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - values.keys())
    if missing:
        raise PromptError(f"template {template!r}: missing variable(s) {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)
