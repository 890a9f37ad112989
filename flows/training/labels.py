"""Token ids and loss labels for one row, from its `messages` and their `train_detail` spans.

`tokenize_row` renders the conversation with the tokenizer's chat template, finds each
content in the rendered text (searching on from the previous turn's end), tokenizes the
text once with a fast tokenizer (for character offsets) and labels by character. A token
covers the characters from its start to the next token's start (Axolotl's range); it is
trained, its label its id, only when all of them lie inside `train: true` spans of
assistant contents. Everything else is -100: system and user turns, the template's own
scaffolding, untrained spans (interpreter output, failed code blocks, a failed first
attempt) and tokens straddling a span edge. With `train_on_eot`, the end-of-turn token
right after an assistant content whose last character is trained is trained as well
(`eot_tokens`, by default the EOS token: `<|im_end|>` for SmolLM2), so the model learns
to stop. An assistant turn without `train_detail` is trained whole.

With TRL (1.x keeps a `labels` column as it is, packing included):

    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from flows.training.labels import tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    rows = load_dataset("parquet", data_files="out/sft.parquet", split="train")
    train = tokenize_dataset(rows, tokenizer, max_length=4096)
    trainer = SFTTrainer(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        processing_class=tokenizer,
        train_dataset=train,  # has input_ids: TRL skips its own tokenization
        args=SFTConfig(output_dir="out/sft-model", max_length=4096),
    )
    trainer.train()
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Any

IGNORE_INDEX = -100


def _trained_ranges(spans: Sequence[Mapping[str, Any]] | None, length: int, where: str) -> list[tuple[int, int]]:
    """The `[start, end)` ranges of `train: true` spans, after checking the spans tile the content."""
    if spans is None:
        return [(0, length)]
    ranges: list[tuple[int, int]] = []
    expected = 0  # the next character the spans must cover
    for span in spans:
        begin, end, train = span["begin_offset"], span["end_offset"], span["train"]
        if begin < expected:
            problem = f"overlaps the previous span (expected begin_offset {expected})"
        elif begin > expected:
            problem = f"leaves characters {expected}..{begin - 1} uncovered"
        elif end < begin:
            problem = "ends before it begins"
        elif end >= length:
            problem = f"goes past the end of the content ({length} characters)"
        else:
            problem = ""
        if problem:
            raise ValueError(f"{where}: train_detail span {begin}..{end} (end inclusive) {problem}")
        if train:
            ranges.append((begin, end + 1))
        expected = end + 1
    if expected != length:
        raise ValueError(f"{where}: train_detail covers {expected} of the content's {length} characters")
    return ranges


def _token_ids(tokenizer: Any, names: Iterable[str | None]) -> set[int]:
    ids = set()
    for name in filter(None, names):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != name:
            raise ValueError(f"end-of-turn token {name!r} is not a single token of the vocabulary")
        ids.add(token_id)
    return ids


def tokenize_row(
    row: Mapping[str, Any],
    tokenizer: Any,
    *,
    train_on_eot: bool = True,
    eot_tokens: Sequence[str] | None = None,
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """`input_ids`, `attention_mask` and `labels` (-100 where not trained) for one row.

    `tokenizer`: a fast Hugging Face tokenizer with a chat template. `eot_tokens`: the
    end-of-turn tokens trained after a trained assistant turn (default: the EOS token).
    `max_length`: keep the first tokens only. Raises ValueError, naming the row id and
    the message index, when an assistant content is not found in the rendered template
    or its spans do not tile it (gap, overlap, out of range).
    """
    messages = row["messages"]
    text = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False
    )
    trained = bytearray(len(text))  # 1 for each rendered character inside a trained span
    eot_at: list[int] = []  # rendered offsets right after a trained assistant content
    cursor = 0
    for index, message in enumerate(messages):
        content = message["content"]
        where = f"row {row['id']!r}, message {index}" if "id" in row else f"message {index}"
        start = text.find(content, cursor)
        if start < 0:
            if message["role"] == "assistant":
                raise ValueError(f"{where}: assistant content not found in the chat template's rendering")
            continue  # a template may reformat other turns; they are never trained
        cursor = start + len(content)
        if message["role"] != "assistant":
            continue
        for begin, end in _trained_ranges(message.get("train_detail"), len(content), where):
            trained[start + begin : start + end] = b"\x01" * (end - begin)
        if content and trained[cursor - 1]:
            eot_at.append(cursor)

    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    covered = list(accumulate(trained, initial=0))  # covered[i]: trained characters before i
    labels = [IGNORE_INDEX] * len(ids)
    for k, (first, last) in enumerate(offsets):
        stop = max(last, offsets[k + 1][0] if k + 1 < len(offsets) else len(text))
        if first < stop and covered[stop] - covered[first] == stop - first:
            labels[k] = ids[k]
    if train_on_eot:
        eot_ids = _token_ids(tokenizer, [tokenizer.eos_token] if eot_tokens is None else eot_tokens)
        starts = [first for first, _ in offsets]
        for position in eot_at:  # the end-of-turn tokens that immediately follow the content
            k = bisect_left(starts, position)
            while k < len(ids) and ids[k] in eot_ids:
                labels[k] = ids[k]
                k += 1
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_rows(rows: Iterable[Mapping[str, Any]], tokenizer: Any, **options: Any) -> list[dict[str, list[int]]]:
    """`tokenize_row` over rows (dicts, as `datasets` yields them)."""
    return [tokenize_row(row, tokenizer, **options) for row in rows]


def tokenize_dataset(dataset: Any, tokenizer: Any, *, num_proc: int | None = None, **options: Any) -> Any:
    """A `datasets.Dataset` of `input_ids`/`attention_mask`/`labels`, the row columns dropped."""
    return dataset.map(
        tokenize_row,
        fn_kwargs={"tokenizer": tokenizer, **options},
        remove_columns=dataset.column_names,
        num_proc=num_proc,
    )
