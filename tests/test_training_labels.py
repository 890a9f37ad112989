"""Token labels from `train_detail` spans (flows/training/labels.py).

The first tests use a word-level tokenizer built in-process (no files, no model), so the
labelling logic is covered under `-m "not model"`; the `model` tests use the real
tokenizer of the embedded SmolLM2 GGUF (`flows.models.checkpoints.gguf_tokenizer`), checked against llama.cpp.
"""

from __future__ import annotations

import re

import datasets
import pytest

from flows.training.labels import IGNORE_INDEX, tokenize_dataset, tokenize_row, tokenize_rows

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

TOOL_ANSWER = (
    "Let me compute.\n<code>\nprint(2+3)\n</code>\n<executor>\n5\n</executor>\n"
    "So the answer is <answer>\\boxed{5}</answer>"
)
EXECUTOR = "<executor>\n5\n</executor>"  # the span the tool teacher marks (tags included, newlines not)
RETRY_ANSWER = "The answer is 6.\nWait, let me recheck: 2+3 is 5.\nThe answer is <answer>\\boxed{5}</answer>"


def spans(content: str, *untrained: str) -> list[dict]:
    """`train_detail` for `content` with the given substrings untrained (Axolotl: end inclusive)."""
    cuts = sorted((content.index(part), content.index(part) + len(part)) for part in untrained)
    out, position = [], 0
    for start, end in cuts:
        if start > position:
            out.append({"begin_offset": position, "end_offset": start - 1, "train": True})
        out.append({"begin_offset": start, "end_offset": end - 1, "train": False})
        position = end
    if position < len(content):
        out.append({"begin_offset": position, "end_offset": len(content) - 1, "train": True})
    return out


def row(answer: str, detail: list[dict] | None, *, system: str | None = None, problem: str = "What is 2+3?") -> dict:
    head = [{"role": "system", "content": system, "train_detail": None}] if system else []
    return {
        "id": "p-1",
        "messages": head
        + [
            {"role": "user", "content": problem, "train_detail": None},
            {"role": "assistant", "content": answer, "train_detail": detail},
        ],
    }


def labelled(tokenizer, encoded: dict) -> list[str]:
    return [
        tokenizer.convert_ids_to_tokens(i)
        for i, label in zip(encoded["input_ids"], encoded["labels"], strict=True)
        if label != IGNORE_INDEX
    ]


def labels_at(tokenizer, encoded: dict, text: str, start: int, end: int) -> list[int]:
    """Labels of the tokens that start inside `text[start:end]` of the rendering."""
    offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    assert len(offsets) == len(encoded["labels"])
    return [label for (first, _), label in zip(offsets, encoded["labels"], strict=True) if start <= first < end]


def check_invariants(encoded: dict) -> None:
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == len(encoded["attention_mask"])
    assert set(encoded["attention_mask"]) == {1}
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(encoded["input_ids"], encoded["labels"], strict=True))


# -- a word-level tokenizer built in-process --------------------------------------------------


@pytest.fixture(scope="module")
def words():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    corpus = [
        TOOL_ANSWER,
        RETRY_ANSWER,
        "system user assistant Be brief. What is 2+3? Say 5 Good Bad Right Wrong abcdef ghi",
    ]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()  # \w+|[^\w\s]+, whitespace dropped
    tok.train_from_iterator(
        corpus, tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|im_start|>", "<|im_end|>"])
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"]
    )
    fast.chat_template = CHATML
    return fast


def test_executor_output_and_the_user_turn_are_not_trained(words):
    example = row(TOOL_ANSWER, spans(TOOL_ANSWER, EXECUTOR), system="Be brief.")
    encoded = tokenize_row(example, words)
    check_invariants(encoded)
    assert encoded["input_ids"] == words.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in example["messages"]], tokenize=True, return_dict=False
    )
    assert labelled(words, encoded) == [
        "Let", "me", "compute", ".", "<", "code", ">", "print", "(", "2", "+", "3", ")", "</", "code", ">",
        "So", "the", "answer", "is", "<", "answer", ">\\", "boxed", "{", "5", "}</", "answer", ">",
        "<|im_end|>",
    ]  # fmt: skip
    text = words.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in example["messages"]], tokenize=False
    )
    executor = text.index(EXECUTOR)
    assert set(labels_at(words, encoded, text, executor, executor + len(EXECUTOR))) == {IGNORE_INDEX}
    assert set(labels_at(words, encoded, text, 0, text.index("<|im_start|>assistant"))) == {IGNORE_INDEX}


def test_failed_first_attempt_is_not_trained(words):
    first = RETRY_ANSWER[: RETRY_ANSWER.index("Wait")]  # "The answer is 6.\n"
    encoded = tokenize_row(row(RETRY_ANSWER, spans(RETRY_ANSWER, first)), words)
    assert labelled(words, encoded) == words.tokenize(RETRY_ANSWER[len(first) :]) + ["<|im_end|>"]
    assert "6" not in labelled(words, encoded)


def test_a_token_straddling_a_span_edge_is_not_trained(words):
    # Axolotl's token range runs from its start to the next token's start, so the dropped
    # whitespace after "." belongs to "." : an untrained "\n" right after it untrains it.
    encoded = tokenize_row(row("Good.\nBad.", spans("Good.\nBad.", "\nBad.")), words)
    assert labelled(words, encoded) == ["Good"]  # and no <|im_end|>: the turn ends untrained
    encoded = tokenize_row(row("Wrong.\nRight.", spans("Wrong.\nRight.", "Wrong.")), words)
    assert labelled(words, encoded) == ["Right", ".", "<|im_end|>"]
    encoded = tokenize_row(row("abcdef ghi", spans("abcdef ghi", "def")), words)  # a span edge mid-word
    assert labelled(words, encoded) == ["ghi", "<|im_end|>"]


def test_end_of_turn_options_and_truncation(words):
    example = row(TOOL_ANSWER, spans(TOOL_ANSWER, EXECUTOR))
    assert "<|im_end|>" not in labelled(words, tokenize_row(example, words, train_on_eot=False))
    assert labelled(words, tokenize_row(example, words, eot_tokens=["<|im_start|>"]))[-1] == ">"
    with pytest.raises(ValueError, match=re.escape("end-of-turn token '<|nope|>' is not a single token")):
        tokenize_row(example, words, eot_tokens=["<|nope|>"])
    full = tokenize_row(example, words)
    short = tokenize_row(example, words, max_length=20)
    assert short == {key: value[:20] for key, value in full.items()}


def test_assistant_without_train_detail_is_trained_whole_and_search_starts_after_the_user_turn(words):
    example = {
        "messages": [
            {"role": "user", "content": "Say 5", "train_detail": None},
            {"role": "assistant", "content": "5", "train_detail": None},
        ]
    }
    encoded = tokenize_row(example, words)
    tokens = words.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[:4] == ["<|im_start|>", "user", "Say", "5"] and encoded["labels"][3] == IGNORE_INDEX
    assert labelled(words, encoded) == ["5", "<|im_end|>"]


def test_multi_turn_rows_and_dataset_map(words):
    messages = [
        {"role": "user", "content": "What is 2+3?", "train_detail": None},
        {
            "role": "assistant",
            "content": "Bad.",
            "train_detail": [{"begin_offset": 0, "end_offset": 3, "train": False}],
        },
        {"role": "user", "content": "Wrong", "train_detail": None},
        {"role": "assistant", "content": TOOL_ANSWER, "train_detail": spans(TOOL_ANSWER, EXECUTOR)},
    ]
    rows = [{"id": "p-2", "messages": messages}, row(RETRY_ANSWER, spans(RETRY_ANSWER, "The answer is 6.\n"))]
    encoded = tokenize_rows(rows, words)
    assert labelled(words, encoded[0])[:4] == ["Let", "me", "compute", "."]
    assert "Bad" not in labelled(words, encoded[0]) and labelled(words, encoded[0]).count("<|im_end|>") == 1
    dataset = datasets.Dataset.from_list(rows)  # Arrow: train_detail of user turns comes back None
    mapped = tokenize_dataset(dataset, words)
    assert mapped.column_names == ["input_ids", "attention_mask", "labels"]
    assert [dict(r) for r in mapped] == encoded


@pytest.mark.parametrize(
    ("detail", "problem"),
    [
        (
            [{"begin_offset": 0, "end_offset": 3, "train": True}, {"begin_offset": 3, "end_offset": 9, "train": True}],
            "overlaps",
        ),
        (
            [{"begin_offset": 0, "end_offset": 3, "train": True}, {"begin_offset": 5, "end_offset": 9, "train": True}],
            "uncovered",
        ),
        ([{"begin_offset": 0, "end_offset": 10, "train": True}], "past the end"),
        ([{"begin_offset": 0, "end_offset": 5, "train": True}], "covers 6 of the content's 10"),
        (
            [{"begin_offset": 0, "end_offset": 9, "train": True}, {"begin_offset": 10, "end_offset": 9, "train": True}],
            "past the end|ends before",
        ),
    ],
)
def test_bad_spans_raise_naming_row_and_message(words, detail, problem):
    with pytest.raises(ValueError, match=rf"row 'p-1', message 2: train_detail .*({problem})"):
        tokenize_row(row("abcdef ghi", detail, system="Be brief."), words)


def test_content_the_template_changes_raises(words):
    original = words.chat_template
    words.chat_template = CHATML.replace("m['content'] }}", "m['content'] | trim }}")
    try:
        with pytest.raises(ValueError, match="row 'p-1', message 1: assistant content not found"):
            tokenize_row(row(" Good. ", [{"begin_offset": 0, "end_offset": 6, "train": True}]), words)
    finally:
        words.chat_template = original


# -- the embedded model's real tokenizer (SmolLM2, byte-level BPE, ChatML) ---------------------


@pytest.fixture(scope="module")
def smollm2():
    from flows.models.embedded import embedded_gguf_path
    from flows.models.checkpoints import gguf_tokenizer

    path = embedded_gguf_path()
    tokenizer = gguf_tokenizer(path)
    tokenizer.gguf_path = path
    return tokenizer


def trained_runs(tokenizer, encoded: dict) -> list[str]:
    """The labelled tokens, decoded run by run (consecutive labelled positions)."""
    runs, current, previous = [], [], None
    for index, label in enumerate(encoded["labels"]):
        if label == IGNORE_INDEX:
            continue
        if previous is not None and index != previous + 1:
            runs.append(current)
            current = []
        current.append(label)
        previous = index
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def rendered(tokenizer, example: dict) -> str:
    return tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in example["messages"]], tokenize=False
    )


@pytest.mark.model
def test_smollm2_tokens_match_llama_cpp(smollm2):
    llama_cpp = pytest.importorskip("llama_cpp")
    text = rendered(smollm2, row(TOOL_ANSWER, None, system="Be brief."))
    text += "2025 + 317 = 2342,  µ café 🙂\n\n\tdone"
    llm = llama_cpp.Llama(model_path=str(smollm2.gguf_path), vocab_only=True, verbose=False)
    assert smollm2(text, add_special_tokens=False)["input_ids"] == llm.tokenize(
        text.encode(), add_bos=False, special=True
    )


@pytest.mark.model
def test_smollm2_executor_output_is_not_trained(smollm2):
    example = row(TOOL_ANSWER, spans(TOOL_ANSWER, EXECUTOR), system="You are a careful solver.")
    encoded = tokenize_row(example, smollm2)
    check_invariants(encoded)
    assert trained_runs(smollm2, encoded) == [
        "Let me compute.\n<code>\nprint(2+3)\n</code>\n",
        "\nSo the answer is <answer>\\boxed{5}</answer><|im_end|>",
    ]
    text = rendered(smollm2, example)
    five = text.index("<executor>\n5\n") + len("<executor>\n")
    assert labels_at(smollm2, encoded, text, five, five + 2) == [IGNORE_INDEX, IGNORE_INDEX]  # "5", "\n"
    assert set(labels_at(smollm2, encoded, text, 0, text.index("<|im_start|>assistant"))) == {IGNORE_INDEX}
    assert "careful" not in smollm2.decode([label for label in encoded["labels"] if label != IGNORE_INDEX])


@pytest.mark.model
def test_smollm2_failed_first_attempt_and_default_system_prompt(smollm2):
    # as stitched: the failed attempt, rstripped, and "\n\n" untrained; the transition on
    answer = "The answer is 6.\n\nWait, let me recheck that.\n\nThe answer is <answer>\\boxed{5}</answer>"
    example = row(answer, spans(answer, "The answer is 6.\n\n"))
    assert "You are a helpful AI assistant named SmolLM" in rendered(smollm2, example)  # the template's own system turn
    encoded = tokenize_row(example, smollm2)
    assert trained_runs(smollm2, encoded) == [
        "Wait, let me recheck that.\n\nThe answer is <answer>\\boxed{5}</answer><|im_end|>"
    ]
    assert trained_runs(smollm2, tokenize_row(example, smollm2, train_on_eot=False))[-1].endswith("</answer>")


@pytest.mark.model
def test_smollm2_a_span_starting_at_a_word_loses_it_to_the_space_before(smollm2):
    # byte-level BPE glues a space to the word after it ("Ġthe"): a span that starts at the
    # word rather than at the space leaves that token straddling the edge, so it is untrained
    answer = "So the answer is 5."
    example = row(
        answer,
        [{"begin_offset": 0, "end_offset": 2, "train": False}, {"begin_offset": 3, "end_offset": 18, "train": True}],
    )
    assert trained_runs(smollm2, tokenize_row(example, smollm2)) == [" answer is 5.<|im_end|>"]
    example["messages"][-1]["train_detail"] = [
        {"begin_offset": 0, "end_offset": 1, "train": False},
        {"begin_offset": 2, "end_offset": 18, "train": True},
    ]
    assert trained_runs(smollm2, tokenize_row(example, smollm2)) == [" the answer is 5.<|im_end|>"]


@pytest.mark.model
def test_smollm2_bad_spans_raise(smollm2):
    with pytest.raises(ValueError, match=r"row 'p-1', message 1: train_detail span 0\.\.3 \(end inclusive\) overlaps"):
        tokenize_row(
            row(
                "Hello there",
                [
                    {"begin_offset": 0, "end_offset": 4, "train": True},
                    {"begin_offset": 0, "end_offset": 3, "train": True},
                ],
            ),
            smollm2,
        )


@pytest.mark.model
@pytest.mark.parametrize("first_role", ["tool", "reasoning"])
@pytest.mark.parametrize("g1,g2", [(True, True), (True, False), (False, True)])
def test_smollm2_stitched_rows_label_exactly_their_trained_text(smollm2, first_role, g1, g2):
    """Every stitching case in both orders: the labelled tokens are the trained characters."""
    from test_trajectories import PROBLEM, reasoning_answer, tool_answer

    from flows.inputs.prompts import load_prompt
    from flows.stages.stitching import stitch_pair
    from flows.training.masks import trained_text

    make = {"tool": tool_answer, "reasoning": reasoning_answer}
    second_role = "reasoning" if first_role == "tool" else "tool"
    composite = stitch_pair(PROBLEM, make[first_role](g1), make[second_role](g2), load_prompt("transitions"))
    example = composite.model_dump()
    encoded = tokenize_row(example, smollm2, train_on_eot=False)
    check_invariants(encoded)
    assistant = composite.messages[-1]
    expected = [
        assistant.content[s.begin_offset : s.end_offset + 1] for s in assistant.train_detail if s.train
    ]
    assert trained_runs(smollm2, encoded) == expected
    assert "".join(expected) == trained_text(assistant.content, assistant.train_detail)
    assert not any("ZeroDivisionError" in run or "42 <answer>x" in run for run in expected)
