"""Prompt files under `prompts/`, looked up by name and rendered strictly.

A prompt file is YAML with `variables` (the names it needs), optional `system`,
`few_shot` (chat turns) and any number of `{{name}}` templates. Rendering refuses
a missing or undeclared variable, so a broken prompt fails before any model call.
Double braces are used because LaTeX (`\\boxed{}`) is full of single ones.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class PromptError(ValueError):
    """A prompt file that is missing, malformed, or rendered with wrong variables."""


@dataclass(frozen=True)
class PromptFile:
    name: str
    variables: tuple[str, ...]
    data: dict[str, Any] = field(repr=False)
    digest: str  # sha256 of the file text: part of every cache key that uses it

    def template(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str):
            raise PromptError(f"prompts/{self.name}.yaml: no text template `{key}`")
        return value

    def render(self, key: str, **values: object) -> str:
        """Fill `{{name}}` placeholders of template `key`; every placeholder must be given."""
        text = self.template(key)
        needed = set(_PLACEHOLDER.findall(text))
        missing = sorted(needed - values.keys())
        if missing:
            raise PromptError(f"prompts/{self.name}.yaml `{key}`: missing variable(s) {', '.join(missing)}")
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)

    def chat(self, **values: object) -> list[dict[str, str]]:
        """system + few-shot turns + the rendered `user` turn, as chat messages."""
        undeclared = sorted(set(values) - set(self.variables))
        if undeclared:
            raise PromptError(f"prompts/{self.name}.yaml: undeclared variable(s) {', '.join(undeclared)}")
        messages: list[dict[str, str]] = []
        if self.data.get("system"):
            messages.append({"role": "system", "content": self.template("system").strip()})
        for turn in self.data.get("few_shot") or []:
            messages.append({"role": turn["role"], "content": str(turn["content"]).strip()})
        messages.append({"role": "user", "content": self.render("user", **values)})
        return messages


@lru_cache(maxsize=None)
def load_prompt(name: str, directory: Path = PROMPTS_DIR) -> PromptFile:
    path = directory / f"{name}.yaml"
    try:
        text = path.read_text()
    except OSError:
        available = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
        raise PromptError(f"no prompt file {path} (available: {available})") from None
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise PromptError(f"{path}: a prompt file must be a YAML mapping")
    variables = tuple(data.get("variables") or ())
    for turn in data.get("few_shot") or []:
        if not isinstance(turn, dict) or turn.get("role") not in {"user", "assistant"} or "content" not in turn:
            raise PromptError(f"{path}: few_shot turns need role user|assistant and content, got {turn!r}")
    return PromptFile(name, variables, data, hashlib.sha256(text.encode()).hexdigest()[:16])
