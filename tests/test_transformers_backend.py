"""The transformers backend (flows/models/transformers_backend.py).

Most tests use a tiny random Llama and a character-level ChatML tokenizer built offline
(no download, no GGUF); the exact stop/EOS/length rules use a scripted "model" that emits
a fixed text. The `model` tests run the embedded SmolLM2 GGUF through transformers.
"""

from __future__ import annotations

import asyncio
import string
import threading
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from flows.models.client import ModelRequestError  # noqa: E402
from flows.models.journal import RequestJournal  # noqa: E402
from flows.models.transformers_backend import (  # noqa: E402
    GenerationCancelled,
    LoadedModel,
    _nucleus,
    Sampling,
    TransformersClient,
    find_stop,
    generate,
    load_checkpoint,
    render_prompt,
    unload_checkpoint,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["[UNK]", "<|im_start|>", "<|im_end|>"]
CHARS = string.ascii_lowercase + string.digits + " \n.,:=+<>/()"
MESSAGES = [{"role": "user", "content": "what is 2+3"}]


def char_tokenizer():
    """One token per character (ChatML specials kept whole); decoding concatenates."""
    from tokenizers import Regex, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIALS + list(CHARS))}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved checkpoint folder: a 1-layer random Llama and the character tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = char_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def special_ids(tokenizer=None) -> dict[str, float]:
    """A logit_bias that keeps the specials (EOS included) from being sampled."""
    tokenizer = tokenizer or char_tokenizer()
    return {str(tokenizer.convert_tokens_to_ids(t)): -100.0 for t in SPECIALS}


def client_for(checkpoint, journal_dir, **fields) -> TransformersClient:
    return TransformersClient(model="tiny", checkpoint=checkpoint, journal=RequestJournal(journal_dir), **fields)


def chat(client, params, messages=MESSAGES, **kw):
    async def go():
        try:
            return await client.chat(messages, params, **kw)
        finally:
            await client.aclose()

    return asyncio.run(go())


# -- the tiny random Llama, loaded from its folder ---------------------------------------------------


def test_same_seed_same_text_other_seed_or_sample_other_text(tiny, tmp_path):
    params = {"temperature": 1.0, "max_tokens": 40, "seed": 7, "logit_bias": special_ids()}
    first = chat(client_for(tiny, tmp_path / "a"), params)
    again = chat(client_for(tiny, tmp_path / "b"), params)  # another journal: generated again
    other_seed = chat(client_for(tiny, tmp_path / "c"), {**params, "seed": 8})
    other_sample = chat(client_for(tiny, tmp_path / "d"), params, sample=1)  # sent with seed + 1
    assert not again.replayed and first.content == again.content and len(first.content) == 40
    assert other_seed.content != first.content
    assert other_sample.content == other_seed.content
    assert first.prompt_tokens == len(render_prompt(char_tokenizer(), MESSAGES))


def test_max_tokens_cuts_with_finish_reason_length(tiny, tmp_path):
    response = chat(client_for(tiny, tmp_path), {"temperature": 1.0, "max_tokens": 5, "seed": 1,
                                                 "logit_bias": special_ids()})
    assert response.finish_reason == "length" and response.completion_tokens == 5 and len(response.content) == 5


def test_stop_string_ends_generation_and_is_not_returned(tiny, tmp_path):
    tokenizer = char_tokenizer()
    bias = {**special_ids(), str(tokenizer.convert_tokens_to_ids("q")): 2.0}  # "q" now likely
    client = client_for(tiny, tmp_path)
    response = chat(client, {"temperature": 1.0, "max_tokens": 200, "seed": 3, "stop": ["q"], "logit_bias": bias})
    assert response.finish_reason == "stop" and response.content and "q" not in response.content
    assert response.completion_tokens == len(response.content) + 1  # the token that made the stop counts
    plain = chat(client_for(tiny, tmp_path / "plain"), {"temperature": 1.0, "max_tokens": 200, "seed": 3,
                                                         "logit_bias": bias})
    assert plain.content.startswith(response.content + "q")  # same samples, cut at the first "q"


def test_greedy_and_a_tiny_top_p_ignore_the_seed(tiny, tmp_path):
    bias = special_ids()
    greedy = [chat(client_for(tiny, tmp_path / f"g{s}"), {"temperature": 0, "max_tokens": 12, "seed": s,
                                                           "logit_bias": bias}).content for s in (1, 2)]
    nucleus = [chat(client_for(tiny, tmp_path / f"p{s}"), {"temperature": 1.0, "top_p": 1e-6, "max_tokens": 12,
                                                            "seed": s, "logit_bias": bias, "logprobs": True})
               for s in (1, 2)]
    assert greedy[0] == greedy[1] == nucleus[0].content == nucleus[1].content
    assert nucleus[0].confidence.mean_logprob == 0.0  # one token left: sampled with probability 1


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])  # 0.1: nearly flat, the nucleus is past the candidates
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_nucleus_equals_the_full_sort(scale, top_p):
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * scale
    ordered, order = torch.sort(logits, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    ordered = ordered.masked_fill(torch.cumsum(probs, dim=-1) - probs >= top_p, float("-inf"))
    expected = torch.full_like(logits, float("-inf")).scatter(0, order, ordered)
    assert torch.equal(_nucleus(logits, top_p, candidates=256), expected)


def test_logprobs_give_a_confidence(tiny, tmp_path):
    params = {"temperature": 1.0, "max_tokens": 20, "seed": 5, "logit_bias": special_ids()}
    without = chat(client_for(tiny, tmp_path / "a"), params)
    response = chat(client_for(tiny, tmp_path / "b"), {**params, "logprobs": True})
    assert without.confidence is None and response.content == without.content
    confidence = response.confidence
    assert confidence.tokens == response.completion_tokens == 20
    assert confidence.lowest_window <= confidence.mean_logprob < 0


def test_journal_replays_and_a_fresh_client_loads_nothing(tiny, tmp_path):
    params = {"temperature": 0.8, "max_tokens": 16, "seed": 2, "logprobs": True}
    client = client_for(tiny, tmp_path / "j")

    async def twice():
        return await client.chat(MESSAGES, params), await client.chat(MESSAGES, params)

    first, second = asyncio.run(twice())
    assert not first.replayed and second.replayed and (client.stats.sent, client.stats.replayed) == (1, 1)
    assert (second.content, second.finish_reason, second.confidence) == (first.content, first.finish_reason,
                                                                          first.confidence)
    client.journal.close()
    fresh = client_for(tmp_path / "no-such-checkpoint", tmp_path / "j")
    third = chat(fresh, params)
    assert third.replayed and third.content == first.content and fresh.loaded is None
    assert (fresh.stats.sent, fresh.stats.replayed) == (0, 1)


def test_a_checkpoint_loads_once_per_process_until_unloaded(tiny, tmp_path):
    first = load_checkpoint(tiny)
    assert load_checkpoint(str(tiny) + "/") is first and first.eos_ids == {char_tokenizer().eos_token_id}
    client = client_for(tiny, tmp_path)
    chat(client, {"temperature": 0, "max_tokens": 2})
    assert client.loaded is first
    assert unload_checkpoint(tiny) and not unload_checkpoint(tiny)
    assert load_checkpoint(tiny) is not first


def test_tools_bad_params_and_missing_checkpoints_raise(tiny, tmp_path):
    tool = {"type": "function", "function": {"name": "python", "parameters": {"type": "object"}}}
    with pytest.raises(ModelRequestError, match="tools"):
        chat(client_for(tiny, tmp_path), {"max_tokens": 4}, tools=[tool])
    with pytest.raises(ModelRequestError, match="top_p"):
        chat(client_for(tiny, tmp_path), {"max_tokens": 4, "top_p": 0})
    with pytest.raises(ModelRequestError, match="could not load .*no-such"):
        chat(client_for(tmp_path / "no-such", tmp_path), {"max_tokens": 4})


def test_concurrent_requests_match_sequential_ones(tiny, tmp_path):
    params = [{"temperature": 1.0, "max_tokens": 24, "seed": s, "repeat_penalty": 1.3} for s in range(4)]
    client = client_for(tiny, tmp_path / "together")

    async def together():
        return await asyncio.gather(*(client.chat(MESSAGES, p) for p in params))

    concurrent = asyncio.run(together())
    alone = [chat(client_for(tiny, tmp_path / f"alone{i}"), p) for i, p in enumerate(params)]
    assert [r.content for r in concurrent] == [r.content for r in alone]
    assert len({r.content for r in alone}) == 4


# -- a scripted model: exact stop, EOS and length rules ---------------------------------------------


class Scripted(torch.nn.Module):
    """Puts (nearly) all probability on the next token of `script`, whatever the input."""

    def __init__(self, script: list[int], vocab: int, delay_s: float = 0.0) -> None:
        super().__init__()
        self.script, self.vocab, self.delay_s = script, vocab, delay_s

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=1):
        step = 0 if past_key_values is None else past_key_values + 1
        time.sleep(self.delay_s)
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, 0, self.script[min(step, len(self.script) - 1)]] = 30.0
        return SimpleNamespace(logits=logits, past_key_values=step)


def scripted(text: str, end: bool = False, delay_s: float = 0.0) -> LoadedModel:
    tokenizer = char_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if end else [])
    return LoadedModel(Scripted(ids, len(tokenizer), delay_s), tokenizer, frozenset({tokenizer.eos_token_id}), 512)


def run(loaded: LoadedModel, **sampling) -> tuple[str, str, int]:
    out = generate(loaded, [1, 2, 3], Sampling(**{"temperature": 0.0, **sampling}))
    return out.text, out.finish_reason, out.completion_tokens


def test_a_stop_string_spanning_tokens_cuts_the_content_before_it():
    loaded = scripted("let me run\n<code>\nx = 1\n</code>\nmore text")
    before = "let me run\n<code>\nx = 1\n"
    assert run(loaded, stop=("</code>",)) == (before, "stop", len(before + "</code>"))
    assert run(loaded, stop=("zzz", "run")) == ("let me ", "stop", len("let me run"))  # the earliest stop wins
    assert run(loaded, stop=("</code>",), max_tokens=5) == ("let m", "length", 5)


def test_eos_ends_generation_and_is_not_returned():
    assert run(scripted("hi there", end=True), max_tokens=50) == ("hi there", "stop", len("hi there") + 1)
    assert run(scripted("hi there", end=True), max_tokens=8) == ("hi there", "length", 8)  # EOS did not fit
    assert run(scripted("hi there", end=True), max_tokens=0) == ("", "length", 0)
    assert find_stop("a</code>b</x>", ("</x>", "</code>")) == 1 and find_stop("abc", ()) is None


def test_context_limit_and_cancellation():
    loaded = scripted("abcdefghij")
    loaded.max_positions = 6
    assert run(loaded) == ("abc", "length", 3)  # 3 prompt tokens + 3
    with pytest.raises(ValueError, match="context"):
        generate(loaded, list(range(6)), Sampling())
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        generate(loaded, [1], Sampling(), cancel)


def test_generation_leaves_the_event_loop_free(tmp_path):
    client = client_for("scripted", tmp_path)
    client._model = scripted("x" * 30, delay_s=0.01)  # ~0.3 s of "generation"
    ticks = 0

    async def ticker(done: asyncio.Event):
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    async def go():
        done = asyncio.Event()
        ticking = asyncio.create_task(ticker(done))
        response = await client.chat(MESSAGES, {"temperature": 0, "max_tokens": 30})
        done.set()
        await ticking
        return response

    response = asyncio.run(go())
    assert response.content == "x" * 30 and ticks >= 10


# -- the embedded SmolLM2 GGUF through transformers ------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from flows.models.embedded import EMBEDDED_MODEL_NAME, EmbeddedModelError, embedded_gguf_path

    try:
        return EMBEDDED_MODEL_NAME, embedded_gguf_path()
    except EmbeddedModelError as exc:
        pytest.skip(str(exc))


@pytest.mark.model
def test_embedded_gguf_answers_seeded_requests_identically(smollm2, tmp_path):
    name, path = smollm2
    params = {"temperature": 0.8, "max_tokens": 48, "seed": 5, "logprobs": True}
    messages = [{"role": "user", "content": "Name a colour."}]
    started = time.perf_counter()
    first = chat(TransformersClient(name, path, RequestJournal(tmp_path / "a")), params, messages)
    first_s = time.perf_counter() - started
    second = chat(TransformersClient(name, path, RequestJournal(tmp_path / "b")), params, messages)
    assert first.content.strip() and first.content == second.content and not second.replayed
    assert first.confidence is not None and first.confidence.tokens == first.completion_tokens > 0
    print(f"\nSmolLM2 GGUF via transformers: first request {first_s:.1f}s (load included), "
          f"then {second.completion_tokens} tokens in {second.latency_s:.2f}s "
          f"= {second.completion_tokens / second.latency_s:.1f} tokens/s")


@pytest.mark.model
def test_embedded_gguf_runs_the_tool_teacher(smollm2, tmp_path):
    from flows.execution.sandbox import SandboxLimits, make_sandbox
    from flows.inputs.prompts import load_prompt
    from flows.teachers.tool import ToolTeacher
    from schemas.records import Problem, Trajectory

    name, path = smollm2
    journal = RequestJournal(tmp_path / "journal")
    teacher = ToolTeacher(
        client=TransformersClient(name, path, journal),
        prompt=load_prompt("demo_tool_teacher"),
        params={"temperature": 0.2, "max_tokens": 96, "seed": 1},
        sandbox=make_sandbox("process", SandboxLimits(wall_time_s=5.0)),
        journal=journal,
        max_tool_calls=2,
    )
    problem = Problem(id="p1", problem="Ana has 12 apples and gets 30 more. How many apples does Ana have now?",
                      answer="42")
    trajectory = asyncio.run(teacher.solve(problem, shard="s0"))
    assert isinstance(trajectory, Trajectory) and trajectory.requests >= 1 and trajectory.model == name
    assert trajectory.finish_reason in {"stop", "length", "tool_limit"}
    print(f"\ntool teacher on SmolLM2 (transformers): {trajectory.requests} requests, "
          f"{trajectory.tool_calls} code runs, {trajectory.completion_tokens} tokens, "
          f"finish {trajectory.finish_reason}")
