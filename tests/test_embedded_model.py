"""The real embedded default model (llama.cpp + SmolLM2 GGUF). Run by `make test` and CI;
deselect with `-m "not model"` on a machine without the llama.cpp build."""

from __future__ import annotations

import asyncio

import datasets
import pytest
import yaml

from flows.models.client import ModelClient
from flows.dualdistill import dualdistill
from flows.models.embedded import EMBEDDED_MODEL_NAME, EmbeddedServer
from flows.models.journal import RequestJournal

pytestmark = pytest.mark.model


def test_server_answers_seeded_requests_identically(tmp_path):
    server = EmbeddedServer()

    async def go():
        client = ModelClient(model=EMBEDDED_MODEL_NAME, base_url=server.base_url, journal=RequestJournal(tmp_path / "j"))
        params = {"temperature": 0.8, "max_tokens": 24, "seed": 5}
        messages = [{"role": "user", "content": "Name a colour."}]
        first = await client.chat(messages, params, sample=0)
        client.journal = RequestJournal(tmp_path / "other")  # force a second real request
        second = await client.chat(messages, params, sample=0)
        await client.aclose()
        return first, second

    try:
        first, second = asyncio.run(go())
    finally:
        server.stop()
    assert first.content and first.content == second.content
    assert first.completion_tokens > 0 and not second.replayed


def test_flow_on_the_embedded_model(tmp_path, prefect_harness):
    sampling = {"temperature": 0.2, "max_tokens": 80, "seed": 1, "repeat_penalty": 1.0}
    recipe = {
        "run_name": "embedded-test",
        "output_dir": str(tmp_path / "out"),
        "problems": {"source": "builtin:arithmetic", "limit": 4, "seed": 7},
        "teachers": {
            "tool": {"endpoint": "embedded", "prompt": "demo_tool_teacher", "max_tool_calls": 2, "sampling": sampling},
            "reasoning": {"endpoint": "embedded", "prompt": "demo_reasoning_teacher", "sampling": sampling},
        },
        "stitching": {"order": "both"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary = asyncio.run(dualdistill(str(path)))

    assert summary["problems"] == 4 and sum(summary["cases"].values()) == summary["composites"] + summary["rejected"]
    trajectories = datasets.load_dataset(str(tmp_path / "out" / "trajectories"), split="train")
    assert len(trajectories) == 8 and all(text.strip() for text in trajectories["text"])
    tool_texts = [t for t, role in zip(trajectories["text"], trajectories["teacher"]) if role == "tool"]
    assert any("<code>" in t and "<executor>" in t for t in tool_texts), tool_texts  # it really wrote code
    assert summary["teachers"]["tool"]["model"] == EMBEDDED_MODEL_NAME
    # a rerun is answered from the cache/journal without starting the model server
    from flows.models.embedded import EmbeddedServer

    started = []
    real_start = EmbeddedServer._start
    EmbeddedServer._start = lambda server: started.append(server) or real_start(server)
    try:
        again = asyncio.run(dualdistill(str(path)))
    finally:
        EmbeddedServer._start = real_start
    assert again["cases"] == summary["cases"]
    assert started == [] and again["sent_this_run"] == {"tool": 0, "reasoning": 0}
