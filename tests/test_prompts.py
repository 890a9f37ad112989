"""Golden checks on the prompt files: a prompt edit shows up here as a reviewable diff."""

from __future__ import annotations

import pytest

from flows.inputs.prompts import PROMPTS_DIR, PromptError, load_prompt
from flows.teachers.runtime import DEFAULT_PROMPTS, FUNCTION_CALLING_PROMPT


def test_every_prompt_file_loads_and_every_default_name_resolves():
    names = {p.stem for p in PROMPTS_DIR.glob("*.yaml")}
    assert set(DEFAULT_PROMPTS.values()) | {FUNCTION_CALLING_PROMPT, "transitions"} <= names
    for name in names:
        load_prompt(name)


def test_tool_teacher_chat_renders_few_shot_then_problem():
    messages = load_prompt("tool_teacher").chat(problem="What is \\frac{1}{2} + 1?")
    assert messages[0]["role"] == "system" and "<code>" in messages[0]["content"]
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user", "assistant"] * 2 + ["user"]
    assert messages[2]["content"] == "Multiply the number of boxes by the apples per box.\n<code>\nprint(17 * 23)\n</code>"
    assert messages[-1] == {"role": "user", "content": "What is \\frac{1}{2} + 1?"}


def test_executor_and_limit_templates():
    prompt = load_prompt("tool_teacher")
    assert prompt.render("executor", output="42").strip() == "<executor>\n42\n</executor>"
    assert "3 times" in prompt.render("tool_limit", max_tool_calls=3)


def test_missing_or_undeclared_variables_are_refused():
    prompt = load_prompt("reasoning_teacher")
    with pytest.raises(PromptError, match="missing variable"):
        prompt.render("user")
    with pytest.raises(PromptError, match="undeclared variable"):
        prompt.chat(problem="x", hint="y")
    with pytest.raises(PromptError, match="no prompt file"):
        load_prompt("no_such_prompt")


def test_transition_defaults_are_the_reference_phrases():
    phrases = load_prompt("transitions").data["phrases"]
    assert phrases["both_correct"]["tool"] == (
        "Wait, we can also use text-reasoning as an alternative way to verify the solution.")
    assert phrases["second_corrects"]["tool"] == "Wait, the code is not correct, let's try text reasoning."
    assert phrases["second_corrects"]["reasoning"] == (
        "Wait, use text reasoning is too tedious, let's try code reasoning.")
