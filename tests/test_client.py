from __future__ import annotations

import asyncio
import time
import json

import pytest
from fake_openai import FakeOpenAIServer, Reply

from flows.models.client import ModelClient, ModelRequestError
from flows.models.journal import RequestJournal, request_key

MESSAGES = [{"role": "user", "content": "2+2?"}]
PARAMS = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 50, "seed": 7}


def make_client(server, tmp_path, sleeps=None, **kw) -> ModelClient:
    async def fake_sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return ModelClient(model="m", base_url=server.base_url, journal=RequestJournal(tmp_path / "j"),
                       sleep=fake_sleep, backoff_base_s=0.01, **kw)


def chat(client, **kw):
    async def go():
        try:
            return await client.chat(MESSAGES, PARAMS, **kw)
        finally:
            await client.aclose()
    return asyncio.run(go())


def scripted(*replies: Reply):
    it = iter(replies)
    return lambda body: next(it)


def test_answer_usage_and_seed_per_sample(tmp_path):
    with FakeOpenAIServer(lambda body: Reply(content="four")) as server:
        client = make_client(server, tmp_path)
        response = chat(client, sample=3)
    assert response.content == "four" and response.finish_reason == "stop" and not response.replayed
    assert response.completion_tokens == 1 and response.prompt_tokens >= 0
    assert server.requests[0]["seed"] == 10 and server.requests[0]["n"] == 1


def test_429_honours_retry_after_then_succeeds(tmp_path):
    sleeps: list[float] = []
    replies = scripted(Reply(status=429, headers={"Retry-After": "7"}), Reply(status=503), Reply(content="ok"))
    with FakeOpenAIServer(replies) as server:
        client = make_client(server, tmp_path, sleeps)
        assert chat(client).content == "ok"
    assert len(server.requests) == 3
    assert sleeps[0] >= 7.0 and sleeps[1] < 7.0
    assert client.stats.retries == 2


def test_gives_up_after_max_retries_naming_endpoint(tmp_path):
    with FakeOpenAIServer(lambda body: Reply(status=500)) as server:
        client = make_client(server, tmp_path, max_retries=2)
        with pytest.raises(ModelRequestError) as err:
            chat(client)
    assert len(server.requests) == 3
    assert server.base_url in str(err.value) and "HTTP 500" in str(err.value) and "3 attempts" in str(err.value)


def test_client_errors_are_not_retried(tmp_path):
    with FakeOpenAIServer(lambda body: Reply(status=401)) as server:
        client = make_client(server, tmp_path)
        with pytest.raises(ModelRequestError, match="HTTP 401"):
            chat(client)
    assert len(server.requests) == 1


def test_garbage_answers_are_retried(tmp_path):
    replies = scripted(Reply(raw_body="<html>oops</html>"), Reply(raw_body=json.dumps({"choices": []})),
                       Reply(raw_body='{"choices": [{"message": {"content": "cut'), Reply(content="fine"))
    with FakeOpenAIServer(replies) as server:
        client = make_client(server, tmp_path)
        assert chat(client).content == "fine"
    assert len(server.requests) == 4


def test_an_empty_but_well_formed_answer_is_an_answer_and_journaled(tmp_path):
    with FakeOpenAIServer(lambda body: Reply(content="  \n")) as server:
        first = chat(make_client(server, tmp_path))
    assert first.content == "  \n" and len(server.requests) == 1  # not retried: the same seed says the same
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        again = chat(make_client(dead, tmp_path))
    assert again.replayed and again.content == "  \n" and dead.requests == []


def test_timeout_is_retried(tmp_path):
    replies = scripted(Reply(content="slow", delay_s=2.0), Reply(content="fast"))
    with FakeOpenAIServer(replies) as server:
        client = make_client(server, tmp_path, timeout_s=0.3)
        assert chat(client).content == "fast"


def test_length_is_an_answer_not_retried(tmp_path):
    with FakeOpenAIServer(lambda body: Reply(content="cut", finish_reason="length")) as server:
        client = make_client(server, tmp_path)
        assert chat(client).finish_reason == "length"
    assert len(server.requests) == 1


def test_journal_replays_without_network_and_ignores_the_url(tmp_path):
    with FakeOpenAIServer(lambda body: Reply(content="four", reasoning_content="2+2")) as server:
        first = chat(make_client(server, tmp_path))
    # the server is gone, and the new client points somewhere else: replayed from disk
    client = ModelClient(model="m", base_url="http://127.0.0.1:9/v1", journal=RequestJournal(tmp_path / "j"))
    again = chat(client)
    assert again.replayed and (again.content, again.reasoning_content) == (first.content, first.reasoning_content)
    assert client.stats.replayed == 1 and client.stats.sent == 0


def test_journal_survives_a_torn_last_line(tmp_path):
    journal = RequestJournal(tmp_path / "j")
    journal.record("s", "k1", {"a": 1})
    journal.close()
    with (tmp_path / "j" / "s.jsonl").open("a") as handle:
        handle.write('{"key": "k2", "val')
    reloaded = RequestJournal(tmp_path / "j")
    assert reloaded.get("k1") == {"a": 1} and reloaded.get("k2") is None and len(reloaded) == 1


def test_request_key_depends_on_content_not_order_of_params():
    a = request_key("chat", {"model": "m", "params": {"a": 1, "b": 2}})
    assert a == request_key("chat", {"params": {"b": 2, "a": 1}, "model": "m"})
    assert a != request_key("chat", {"model": "m2", "params": {"a": 1, "b": 2}})


def test_concurrency_is_bounded(tmp_path):
    """Counted where the requests arrive: each is answered 0.2 s after it arrives, so a fourth
    request can arrive only once an earlier one was answered (its slot freed)."""
    arrived = []

    def responder(body):
        arrived.append(time.monotonic())
        return Reply(content="x", delay_s=0.2)

    with FakeOpenAIServer(responder) as server:
        client = make_client(server, tmp_path, max_concurrency=3)

        async def go():
            await asyncio.gather(*(client.chat([{"role": "user", "content": f"q{i}"}], PARAMS) for i in range(12)))
            await client.aclose()
        asyncio.run(go())
    assert len(server.requests) == 12
    # requests that arrived within 0.15 s of each other were in flight together
    together = max(sum(start <= other < start + 0.15 for other in arrived) for start in arrived)
    assert together == 3, arrived
