"""Build recipes and scripted teachers for flow tests and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from fake_openai import Reply, executor_turns, problem_text, teacher_role

# What each teacher gets right, by problem kind.
KINDS = {
    "both_correct": (True, True),
    "tool_only": (True, False),
    "reasoning_only": (False, True),
    "both_wrong": (False, False),
}


def write_problems(path: Path, per_kind: int) -> list[dict]:
    rows = []
    for kind in KINDS:
        for i in range(per_kind):
            a, b = 100 + i, 7 * (i + 1)
            rows.append({"id": f"{kind}-{i}", "problem": f"[{kind}] What is {a} + {b}?", "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def write_recipe(path: Path, problems: Path, base_url: str, output_dir: Path, **overrides) -> Path:
    teacher = {"base_url": base_url, "model": "fake-model", "max_concurrency": 8, "max_retries": 1,
               "timeout_s": 10, "sampling": {"temperature": 0.6, "max_tokens": 256, "seed": 1}}
    recipe = {
        "run_name": "flow-test",
        "output_dir": str(output_dir),
        "problems": {"source": str(problems), "columns": {"id": "id"}},
        "teachers": {"tool": dict(teacher), "reasoning": {**teacher, "model": "fake-reasoner"}},
        "stitching": {"order": "tool_first"},
        "sandbox": {"wall_time_s": 5},
        "shard_size": 3,
        "shard_retries": 0,
    }
    for key, value in overrides.items():
        recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


class ScriptedTeachers:
    """Answers each problem right or wrong by its kind; the tool teacher writes code first."""

    def __init__(self, rows: list[dict]) -> None:
        self.by_text = {r["problem"]: r for r in rows}

    def __call__(self, body: dict) -> Reply:
        text = problem_text(body, list(self.by_text))
        row = self.by_text[text]
        tool_right, reasoning_right = KINDS[row["id"].rsplit("-", 1)[0]]
        a, b = (int(x) for x in text.split("What is ")[1].rstrip("?").split(" + "))
        if teacher_role(body) == "tool":
            if executor_turns(body, text) == 0:
                expression = f"{a} + {b}" if tool_right else f"{a} - {b}"
                return Reply(content=f"Compute it.\n<code>\nprint({expression})\n")
            value = body["messages"][-1]["content"].split("\n")[1]
            return Reply(content=f"The code printed {value}.\n<answer>\\boxed{{{value}}}</answer>")
        value = a + b if reasoning_right else a + b + 1
        return Reply(content=f"<answer>\\boxed{{{value}}}</answer>", reasoning_content=f"{a} plus {b} is {value}.")
