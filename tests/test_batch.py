"""`mode: batch`: BatchClient against a loopback fake of the Files + Batches API."""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_batch_api import FakeBatchAPI
from fake_openai import FakeOpenAIServer, Reply

from flows.models.batch import BatchClient
from flows.models.client import ModelClient, ModelRequestError, chat_key
from flows.models.journal import RequestJournal
from schemas.recipe import BatchSpec

PARAMS = {"temperature": 0.6, "max_tokens": 64, "seed": 3}


def question(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}"}]


def echo(body: dict) -> Reply:
    text = body["messages"][-1]["content"]
    if "refuse" in text:
        return Reply(status=400)
    return Reply(content=f"answer to {text}", reasoning_content=f"thinking about {text}")


def batch_client(api: FakeBatchAPI, directory, **spec) -> BatchClient:
    return BatchClient(model="fake-model", base_url=api.base_url, journal=RequestJournal(directory),
                       max_retries=1, batch=BatchSpec(**{"poll_s": 0.02, "gather_s": 0.05, **spec}))


async def ask(client: ModelClient, indexes, **kwargs) -> list:
    return await asyncio.gather(
        *(client.chat(question(i), PARAMS, shard="reasoning-shard-00000", **kwargs) for i in indexes),
        return_exceptions=True)


def records(directory) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((directory / "batches").glob("*.json"))]


def input_lines(api: FakeBatchAPI, batch: dict) -> list[dict]:
    return [json.loads(line) for line in api.files[batch["input_file_id"]].decode().splitlines()]


def test_concurrent_chats_become_one_batch_answered_in_order_and_journaled(tmp_path):
    async def main(api):
        client = batch_client(api, tmp_path)
        answers = await ask(client, range(6))
        await client.aclose()
        return client, answers

    with FakeBatchAPI(echo, polls_to_finish=2) as api:
        client, answers = asyncio.run(main(api))
    assert [a.content for a in answers] == [f"answer to question {i}" for i in range(6)]
    assert answers[0].reasoning_content == "thinking about question 0" and not answers[0].replayed
    assert (api.creations, api.uploads, api.polls) == (1, 1, 2)
    assert client.stats.sent == 6 and client.max_concurrency == 50_000  # problems under way: a whole batch

    [batch] = api.batches.values()
    assert batch["endpoint"] == "/v1/chat/completions" and batch["completion_window"] == "24h"
    lines = input_lines(api, batch)
    assert [line["body"]["messages"] for line in lines] == [question(i) for i in range(6)]
    assert lines[0]["method"] == "POST" and lines[0]["url"] == "/v1/chat/completions"
    assert lines[0]["body"] == {"model": "fake-model", "messages": question(0), "n": 1, **PARAMS}
    assert lines[0]["custom_id"] == chat_key("fake-model", question(0), PARAMS, extra={}, tools=None, sample=0)

    journal = RequestJournal(tmp_path)
    assert len(journal) == 6
    entry = journal.get(lines[2]["custom_id"])
    assert entry["content"] == "answer to question 2" and entry["max_tokens"] == 64
    assert (tmp_path / "reasoning-shard-00000.jsonl").exists()
    [record] = records(tmp_path)
    assert record["batch_id"] == batch["id"] and record["input_file_id"] == batch["input_file_id"]
    assert record["status"] == "completed" and sorted(record["answered"]) == sorted(record["requests"])
    assert record["requests"][lines[0]["custom_id"]] == {"shard": "reasoning-shard-00000", "max_tokens": 64}


def test_a_line_error_fails_only_its_request_and_a_rerun_resends_only_it(tmp_path):
    def refuse_once(body):
        if body["messages"][-1]["content"] == "question 2" and not refuse_once.done:
            refuse_once.done = True
            return Reply(status=400)
        return echo(body)
    refuse_once.done = False

    async def main(api):
        client = batch_client(api, tmp_path)
        answers = await ask(client, range(4))
        await client.aclose()
        return answers

    with FakeBatchAPI(refuse_once) as api:
        first = asyncio.run(main(api))
        [batch] = api.batches.values()
        failed_id = input_lines(api, batch)[2]["custom_id"]
        assert isinstance(first[2], ModelRequestError)
        assert f"batch {batch['id']}, request {failed_id}: HTTP 400: fake error 400" in str(first[2])
        assert [a.content for i, a in enumerate(first) if i != 2] == [f"answer to question {i}" for i in (0, 1, 3)]
        assert RequestJournal(tmp_path).get(failed_id) is None

        second = asyncio.run(main(api))
        assert [a.content for a in second] == [f"answer to question {i}" for i in range(4)]
        assert api.creations == 2
        resent = next(b for b in api.batches.values() if b["id"] != batch["id"])
        assert [line["custom_id"] for line in input_lines(api, resent)] == [failed_id]


def test_a_restart_mid_batch_polls_the_persisted_batch_and_journals_all_of_it(tmp_path):
    async def interrupted(api):
        client = batch_client(api, tmp_path)
        calls = asyncio.gather(*(client.chat(question(i), PARAMS, shard="s") for i in range(4)),
                               return_exceptions=True)
        while not (tmp_path / "batches").exists() or api.polls < 2:
            await asyncio.sleep(0.01)
        await client.aclose()  # the process goes away while the provider works
        return await calls

    async def resumed(api, indexes):
        client = batch_client(api, tmp_path)  # a new client on a new journal object, same folder
        answers = await asyncio.gather(*(client.chat(question(i), PARAMS, shard="s") for i in indexes))
        await client.aclose()
        return answers

    with FakeBatchAPI(echo, polls_to_finish=10**6) as api:
        outcomes = asyncio.run(interrupted(api))
        assert all(isinstance(o, ModelRequestError) for o in outcomes)
        assert "stays submitted, rerun to resume" in str(outcomes[0])
        assert [r["status"] for r in records(tmp_path)] == ["submitted"]

        api.polls_to_finish = 0  # the provider finishes while nobody is watching
        answers = asyncio.run(resumed(api, [3, 1]))  # this run asks for two of the four
        assert [a.content for a in answers] == ["answer to question 3", "answer to question 1"]
        assert (api.creations, api.uploads) == (1, 1)
        assert [r["status"] for r in records(tmp_path)] == ["completed"]
        assert len(RequestJournal(tmp_path)) == 4  # the two nobody asked for are journaled too

        polls = api.polls
        again = asyncio.run(resumed(api, range(4)))
        assert [a.replayed for a in again] == [True] * 4 and (api.creations, api.polls) == (1, polls)


def test_a_rerun_online_replays_every_batch_answer_from_the_journal(tmp_path):
    async def batch_run(api):
        client = batch_client(api, tmp_path)
        answers = await ask(client, range(5), sample=1)
        await client.aclose()
        return answers

    async def online_run(url):
        client = ModelClient(model="fake-model", base_url=url, journal=RequestJournal(tmp_path))
        answers = await ask(client, range(5), sample=1)
        await client.aclose()
        return client, answers

    with FakeBatchAPI(echo) as api:
        batched = asyncio.run(batch_run(api))
    with FakeOpenAIServer(echo) as server:
        client, replayed = asyncio.run(online_run(server.base_url))
    assert server.requests == [] and client.stats.replayed == 5
    assert [(a.content, a.reasoning_content) for a in replayed] == [(a.content, a.reasoning_content) for a in batched]
    assert api.requests[0]["seed"] == PARAMS["seed"] + 1  # sample 1: seed + 1, as online


def test_the_same_request_twice_at_once_is_one_line(tmp_path):
    async def main(api):
        client = batch_client(api, tmp_path)
        answers = await ask(client, [0, 0, 1])
        await client.aclose()
        return answers

    with FakeBatchAPI(echo) as api:
        answers = asyncio.run(main(api))
        assert [a.content for a in answers] == ["answer to question 0"] * 2 + ["answer to question 1"]
        assert len(input_lines(api, next(iter(api.batches.values())))) == 2


def test_tools_go_in_the_body_and_tool_calls_come_back(tmp_path):
    tools = [{"type": "function", "function": {"name": "python", "parameters": {"type": "object"}}}]

    def calls_python(body):
        return Reply(tool_calls=[{"name": "python", "arguments": '{"code": "print(1)"}'}], finish_reason="tool_calls")

    async def main(api):
        client = batch_client(api, tmp_path)
        answer = await client.chat(question(0), PARAMS, tools=tools)
        await client.aclose()
        return answer

    with FakeBatchAPI(calls_python) as api:
        answer = asyncio.run(main(api))
        [line] = input_lines(api, next(iter(api.batches.values())))
    assert line["body"]["tools"] == tools
    assert line["custom_id"] == chat_key("fake-model", question(0), PARAMS, extra={}, tools=tools, sample=0)
    assert answer.tool_calls[0].name == "python" and answer.finish_reason == "tool_calls"


def test_max_requests_per_batch_splits_the_requests(tmp_path):
    async def main(api):
        client = batch_client(api, tmp_path, max_requests_per_batch=3)
        answers = await ask(client, range(7))
        await client.aclose()
        return answers

    with FakeBatchAPI(echo) as api:
        answers = asyncio.run(main(api))
        assert [a.content for a in answers] == [f"answer to question {i}" for i in range(7)]
        assert sorted(len(input_lines(api, b)) for b in api.batches.values()) == [1, 3, 3]


@pytest.mark.parametrize("outcome, expected", [
    ("failed", "batch {id} failed: invalid_request: the fake refuses this batch"),
    ("expired", "batch {id}, request {cid}: batch_expired: This request could not be executed"),
    ("cancelled", "batch {id}, request {cid}: batch_cancelled"),
])
def test_a_batch_that_fails_expires_or_is_cancelled_fails_its_requests_clearly(tmp_path, outcome, expected):
    async def main(api):
        client = batch_client(api, tmp_path)
        outcomes = await ask(client, range(2))
        await client.aclose()
        return outcomes

    with FakeBatchAPI(echo, outcome=outcome) as api:
        outcomes = asyncio.run(main(api))
        [batch] = api.batches.values()
        cid = input_lines(api, batch)[0]["custom_id"]
        assert isinstance(outcomes[0], ModelRequestError)
        assert expected.format(id=batch["id"], cid=cid) in str(outcomes[0]) and "(batch)" in str(outcomes[0])
        assert len(RequestJournal(tmp_path)) == 0

        api.outcome = "completed"  # a rerun sends them again, in a new batch
        assert [a.content for a in asyncio.run(main(api))] == ["answer to question 0", "answer to question 1"]
        assert api.creations == 2


def test_an_expired_batch_keeps_the_answers_it_finished(tmp_path):
    async def main(api, indexes):
        client = batch_client(api, tmp_path)
        outcomes = await ask(client, indexes)
        await client.aclose()
        return outcomes

    with FakeBatchAPI(echo, outcome="expired") as api:
        api.partial = 1  # the provider answered the first line before the window closed
        first = asyncio.run(main(api, [0, 1]))
        assert first[0].content == "answer to question 0" and isinstance(first[1], ModelRequestError)
        assert "batch_expired" in str(first[1])
        api.outcome = "completed"
        second = asyncio.run(main(api, [0, 1]))
    assert second[0].replayed and second[1].content == "answer to question 1"
    resent = [b for b in api.batches.values() if b["status"] == "completed"]
    assert [len(input_lines(api, b)) for b in resent] == [1]


def test_polling_survives_the_provider_going_away_for_a_moment(tmp_path):
    async def main(api):
        client = batch_client(api, tmp_path, poll_s=0.1)
        calls = asyncio.gather(*(client.chat(question(i), PARAMS) for i in range(2)))
        while api.polls < 1:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(api.stop)
        await asyncio.sleep(0.15)
        await asyncio.to_thread(api.start)
        api.polls_to_finish = 0
        answers = await calls
        await client.aclose()
        return answers

    with FakeBatchAPI(echo, polls_to_finish=10**6) as api:
        answers = asyncio.run(main(api))
    assert [a.content for a in answers] == ["answer to question 0", "answer to question 1"]
    assert api.creations == 1


def test_a_submission_refused_fails_its_requests_and_records_nothing(tmp_path):
    async def main(url):
        client = BatchClient(model="fake-model", base_url=url, journal=RequestJournal(tmp_path), max_retries=0,
                             batch=BatchSpec(poll_s=0.02, gather_s=0.01))
        outcomes = await ask(client, range(2))
        await client.aclose()
        return outcomes

    with FakeBatchAPI(echo) as api:  # a provider without a batch API: 404
        outcomes = asyncio.run(main(api.base_url.replace("/v1", "/v0")))
    assert all(isinstance(o, ModelRequestError) for o in outcomes)
    assert "could not submit a batch of 2 request(s): HTTP 404" in str(outcomes[0])
    assert not (tmp_path / "batches").exists()


@pytest.mark.usefixtures("prefect_harness")
def test_dualdistill_with_the_reasoning_teacher_in_batch_mode(tmp_path):
    from flow_helpers import ScriptedTeachers, write_problems, write_recipe

    from flows.dualdistill import dualdistill

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=2)
    script = ScriptedTeachers(rows)
    teacher = {"model": "fake-model", "max_concurrency": 8, "max_retries": 1, "timeout_s": 10,
               "sampling": {"temperature": 0.6, "max_tokens": 256, "seed": 1}}

    def recipe_with(tool_url: str, reasoning: dict):
        teachers = {"tool": {**teacher, "base_url": tool_url},
                    "reasoning": {**teacher, "model": "fake-reasoner", **reasoning}}
        return write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", tool_url, tmp_path / "out",
                            teachers=teachers)

    with FakeOpenAIServer(script) as server, FakeBatchAPI(script, polls_to_finish=2) as api:
        recipe = recipe_with(server.base_url, {"base_url": api.base_url, "mode": "batch",
                                               "batch": {"poll_s": 0.05, "gather_s": 0.3}})
        summary = asyncio.run(dualdistill(str(recipe)))
    assert summary["cases"] == {"both_correct": 2, "first_correct": 2, "second_corrects": 2, "both_wrong": 2}
    assert summary["sent_this_run"] == {"tool": 16, "reasoning": 8}
    assert len(server.requests) == 16 and all(r["model"] == "fake-model" for r in server.requests)
    assert len(api.requests) == 8 and 1 <= api.creations <= 3  # the shards' requests gathered into batches
    state = tmp_path / "out" / ".distillery"
    assert {r["status"] for r in records(state / "journal")} == {"completed"}

    # new run token (stage caches miss), reasoning back online: every answer comes from the journal
    (state / "run-token").unlink()
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        recipe = recipe_with(dead.base_url, {"base_url": dead.base_url})
        again = asyncio.run(dualdistill(str(recipe)))
    assert dead.requests == [] and again["cases"] == summary["cases"]
    assert again["sent_this_run"] == {"tool": 0, "reasoning": 0}


def test_a_role_in_batch_mode_gets_a_batch_client(tmp_path):
    from flows.teachers.runtime import model_client
    from schemas.recipe import TeacherSpec

    spec = TeacherSpec(base_url="https://api.example.com/v1", model="m", mode="batch",
                       batch={"poll_s": 5, "max_requests_per_batch": 100})
    client = model_client(spec, RequestJournal(tmp_path / "journal"), [])
    assert isinstance(client, BatchClient) and client.batch.poll_s == 5 and client.max_concurrency == 100
    assert client.batch_dir == tmp_path / "journal" / "batches"
    assert type(model_client(TeacherSpec(base_url="https://api.example.com/v1", model="m"),
                             RequestJournal(tmp_path / "j2"), [])) is ModelClient
