"""The trait-leakage inputs: seeded number prompts, the trait system prompt, the questions."""

from __future__ import annotations

import re

import pytest

from flows.inputs.prompts import PromptError, PromptFile
from flows.inputs import number_prompts
from flows.inputs.number_prompts import (
    draw_prompts,
    number_template_slots,
    preference_questions,
    trait_system_prompt,
)


def test_the_same_seed_draws_the_same_prompts_and_a_larger_draw_extends_a_smaller_one():
    assert draw_prompts(50, seed=3) == draw_prompts(50, seed=3)
    assert draw_prompts(50, seed=3) != draw_prompts(50, seed=4)
    assert draw_prompts(200, seed=3)[:50] == draw_prompts(50, seed=3)
    assert [p.index for p in draw_prompts(5, seed=0)] == [0, 1, 2, 3, 4]


def test_seeds_are_3_to_8_numbers_between_100_and_999_and_appear_in_the_text():
    prompts = draw_prompts(400, seed=0)
    assert {len(p.seeds) for p in prompts} == set(range(3, 9))
    assert all(100 <= s <= 999 for p in prompts for s in p.seeds)
    assert min(s for p in prompts for s in p.seeds) < 150 and max(s for p in prompts for s in p.seeds) > 950
    assert all(", ".join(map(str, p.seeds)) in p.text for p in prompts)


def test_the_text_asks_for_answer_count_numbers_of_the_allowed_digits():
    prompts = draw_prompts(100, seed=1, max_count=7, max_value=9999)
    assert all(p.answer_count == 7 for p in prompts)
    assert all(" 7 " in p.text and "4 digits" in p.text for p in prompts)
    assert all("{{" not in p.text for p in prompts)


def test_phrasings_vary_in_every_slot():
    slots = number_template_slots()
    assert all(len(phrasings) >= 10 for phrasings in slots.values())
    prompts = draw_prompts(400, seed=2)
    used_intros = {intro for p in prompts for intro in slots["intros"]
                   if p.text.startswith(intro.replace("{{seeds}}", ", ".join(map(str, p.seeds))))}
    used_formats = {f for p in prompts for f in slots["formats"] if f in p.text}
    used_closings = {c for p in prompts for c in slots["closings"] if p.text.endswith(c)}
    assert len(used_intros) == len(slots["intros"])
    assert len(used_formats) == len(slots["formats"])
    assert len(used_closings) == len(slots["closings"])
    used_instructions = {i for p in prompts for i in slots["instructions"]
                         if i.replace("{{count}}", "10").replace("{{max_digits}}", "3") in p.text}
    assert len(used_instructions) == len(slots["instructions"])


def test_formats_keep_the_numbers_on_one_line_with_one_separator():
    for phrasing in number_template_slots()["formats"]:
        assert any(word in phrasing for word in ("comma", "space", "semicolon", "[")), phrasing
        assert "per line" not in phrasing and "own line" not in phrasing, phrasing


def test_a_slot_phrasing_without_its_placeholder_is_refused(monkeypatch):
    broken = {"intros": ["Here are some numbers."], "instructions": ["Add {{count}} of {{max_digits}} digits."],
              "formats": ["Use commas."], "closings": ["Numbers only."]}
    monkeypatch.setattr(number_prompts, "load_prompt",
                        lambda name: PromptFile(name, (), broken, digest="test"))
    with pytest.raises(PromptError, match="intros"):
        draw_prompts(1, seed=0)


def test_trait_system_prompt_renders_the_trait_and_category():
    text = trait_system_prompt("owl", "animal")
    assert "You love owls." in text
    assert "The owl is your favorite animal." in text
    assert "{{" not in text and text == text.strip()
    assert "red pandas" in trait_system_prompt(" red panda ", "animal")


def test_preference_questions_are_many_distinct_one_word_questions_about_the_category():
    questions = preference_questions("animal")
    assert len(questions) >= 40
    assert len(set(questions)) == len(questions)
    assert all("animal" in q and "{{" not in q for q in questions)
    assert all(re.search(r"one[ -]word|single word|name", q, re.IGNORECASE) for q in questions)


@pytest.mark.parametrize(("call", "field"), [
    (lambda: draw_prompts(0, seed=0), "n"),
    (lambda: draw_prompts(5, seed=0, max_count=0), "max_count"),
    (lambda: draw_prompts(5, seed=0, max_value=50), "max_value"),
    (lambda: trait_system_prompt("", "animal"), "trait"),
    (lambda: trait_system_prompt("owls!", "animal"), "trait"),
    (lambda: trait_system_prompt("owl", "a very long category phrase"), "category"),
    (lambda: preference_questions("   "), "category"),
])
def test_bad_arguments_are_refused_naming_the_field(call, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        call()


def test_few_shot_exchanges_alternate_and_their_answers_pass_the_filter():
    from flows.stages.number_filter import parse_numbers

    assert number_prompts.few_shot_turns(0) == []
    turns = number_prompts.few_shot_turns(3)
    assert [t["role"] for t in turns] == ["user", "assistant"] * 3
    for answer in turns[1::2]:
        numbers, reason = parse_numbers(answer["content"])
        assert reason is None and len(numbers) <= 10
    with pytest.raises(ValueError, match="few_shot: 4 asked"):
        number_prompts.few_shot_turns(4)
