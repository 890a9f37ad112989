"""A published dataset, pre-tokenized for TRL's `SFTTrainer` (`distillery export`).

In:  a published dataset folder (`data/*.parquet` rows with `messages` and their
     `train_detail`, e.g. `out/demo/composites`) and a tokenizer: a name or folder for
     `AutoTokenizer.from_pretrained`, a `.gguf` file, or the embedded model's name.
Out: a folder that `datasets.load_dataset(OUT, split="train")` loads, one row per exported row:

    OUT/data/train-00000-of-00001.parquet   input_ids, attention_mask, labels, assistant_masks
    OUT/README.md                           the source, the tokenizer, the counts, a TRL snippet

The labels come from `flows/training/labels.py` (`tokenize_row`): -100 on the prompt, the
template's scaffolding, executor output and failed first attempts. `assistant_masks` is the same
thing as a 0/1 mask (1 where the label is the token). TRL 1.16 uses a `labels` column as it is
and otherwise folds `assistant_masks` into labels with no config flag, so either way the trainer
sees exactly these labels; `completion_mask` is not written (TRL honours it only with
`completion_only_loss=True`). Rows longer than `max_length` tokens are dropped and counted,
never cut, and so are rows with no trained token.

    distillery export out/demo/composites --tokenizer SmolLM2-135M-Instruct.Q4_1 --to out/sft-tokens
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.training.labels import IGNORE_INDEX, tokenize_row

COLUMNS = ("input_ids", "attention_mask", "labels", "assistant_masks")


class ExportError(RuntimeError):
    """A dataset or tokenizer that cannot be exported; the message says why."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    source: Path
    tokenizer: str
    rows: int  # rows written
    too_long: int  # rows dropped: more than max_length tokens
    untrained: int  # rows dropped: no token with a label
    longest: int  # tokens in the longest row written
    trained_tokens: int  # tokens with a label, over the rows written
    max_length: int | None


def load_tokenizer(name_or_path: str) -> Any:
    """A fast tokenizer with a chat template: from a `.gguf` file or the embedded model's name
    (`gguf_tokenizer`), else `AutoTokenizer.from_pretrained(name_or_path)`."""
    from flows.models.checkpoints import (
        CheckpointError,
        checkpoint_files,
        gguf_tokenizer,
    )
    from flows.models.embedded import EMBEDDED_MODEL_NAME

    try:
        if name_or_path == EMBEDDED_MODEL_NAME or name_or_path.endswith(".gguf"):
            folder, gguf = checkpoint_files(name_or_path)
            if gguf is None:
                raise ExportError(f"tokenizer {name_or_path!r}: not a .gguf file")
            tokenizer = gguf_tokenizer(folder / gguf)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except ExportError:
        raise
    except (CheckpointError, OSError, ValueError) as exc:
        raise ExportError(f"tokenizer {name_or_path!r}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False) or not tokenizer.chat_template:
        raise ExportError(f"tokenizer {name_or_path!r}: needs a fast tokenizer with a chat template")
    return tokenizer


def tokenize_rows(
    rows: Iterable[Mapping[str, Any]], tokenizer: Any, max_length: int | None = None
) -> tuple[dict[str, list[list[int]]], dict[str, int]]:
    """(columns, counts): `tokenize_row` for each row plus its `assistant_masks`, the rows over
    `max_length` tokens or with nothing trained left out and counted."""
    columns: dict[str, list[list[int]]] = {name: [] for name in COLUMNS}
    counts = {"too_long": 0, "untrained": 0}
    for index, row in enumerate(rows):
        if "messages" not in row:
            raise ValueError(f"row {index}: no `messages` column (export the composites or trajectories)")
        encoded = tokenize_row(row, tokenizer)
        mask = [int(label != IGNORE_INDEX) for label in encoded["labels"]]
        if max_length is not None and len(encoded["input_ids"]) > max_length:
            counts["too_long"] += 1
            continue
        if not any(mask):
            counts["untrained"] += 1
            continue
        for name in COLUMNS[:3]:
            columns[name].append(encoded[name])
        columns["assistant_masks"].append(mask)
    return columns, counts


def export_dataset(
    source: Path,
    tokenizer_name: str,
    out: Path,
    *,
    max_length: int | None = None,
    tokenizer: Any = None,
) -> ExportResult:
    """Write `source`'s rows pre-tokenized to `out` (replaced only once complete; an existing
    `out` must be an earlier export). `tokenizer`: an already loaded one, named `tokenizer_name`."""
    import datasets
    import pyarrow.parquet as pq

    source, out = Path(source), Path(out)
    if max_length is not None and max_length < 1:
        raise ExportError(f"--max-length must be at least 1, got {max_length}")
    if not sorted((source / "data").glob("*.parquet")):
        raise ExportError(f"{source}: not a published dataset (no data/*.parquet)")
    if out.exists() and any(out.iterdir()) and not _is_export(out):
        raise ExportError(f"{out}: exists and is not an earlier export; choose another --to")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_name)
    try:
        rows = (row for path in sorted((source / "data").glob("*.parquet")) for row in pq.read_table(path).to_pylist())
        columns, counts = tokenize_rows(rows, tokenizer, max_length)
    except ValueError as exc:  # spans that do not tile a content, a content the template changes
        raise ExportError(f"{source}: {exc}") from exc
    result = ExportResult(
        path=out,
        source=source,
        tokenizer=tokenizer_name,
        rows=len(columns["input_ids"]),
        longest=max(map(len, columns["input_ids"]), default=0),
        trained_tokens=sum(map(sum, columns["assistant_masks"])),
        max_length=max_length,
        **counts,
    )
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "attention_mask": datasets.List(datasets.Value("int8")),
            "labels": datasets.List(datasets.Value("int32")),
            "assistant_masks": datasets.List(datasets.Value("int8")),
        }
    )
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "data").mkdir(parents=True)
        table = datasets.Dataset.from_dict(columns, features=features).data.table
        pq.write_table(table, staging / "data" / "train-00000-of-00001.parquet", compression="zstd")
        (staging / "README.md").write_text(export_card(result), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


_CARD_MARK = "<!-- distillery export -->"
_CARD_HEADER = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
---
"""


def _is_export(folder: Path) -> bool:
    card = folder / "README.md"
    return card.is_file() and _CARD_MARK in card.read_text(encoding="utf-8", errors="replace")


def trl_snippet(dataset: str, tokenizer: str, max_length: int | None, model: str | None = None) -> str:
    """Python that trains on an export with TRL's `SFTTrainer`, its labels used as they are.
    `max_length`: the export's; None keeps TRL (default 1024) from cutting rows."""
    model_line = f"model={json.dumps(model)}," if model else f'model="MODEL",  # a model with the tokenizer {tokenizer}'
    return f"""from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

train = load_dataset({json.dumps(dataset)}, split="train")
trainer = SFTTrainer(
    {model_line}
    train_dataset=train,  # has input_ids: TRL skips its own tokenization and keeps `labels`
    args=SFTConfig(output_dir="sft-model", max_length={max_length}),
)
trainer.train()"""


STUDENT = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the cards' example student


def card_sections(dataset: str, student: str = STUDENT) -> dict[str, str]:
    """The dataset card's training sections for a published dataset with `train_detail`, at
    `dataset` (its folder): a ready Axolotl config and a ready TRL recipe."""
    return {"Training with Axolotl": axolotl_section(dataset, student), "Training with TRL": trl_section(dataset, student)}


def axolotl_section(dataset: str, student: str = STUDENT) -> str:
    """Axolotl's `chat_template` strategy reads `train_detail` itself (docs/training-data.md)."""
    return f"""Axolotl's `chat_template` datasets read the spans of `train_detail` themselves. Needs
`eot_tokens`: with a GGUF's tokenizer under Axolotl's transformers, the EOS token loads as
`<|im_start|>`, and only `eot_tokens` keeps the closing `<|im_end|>` of each trained turn trained.

```yaml
{axolotl_config(dataset, student)}
```"""


def axolotl_config(dataset: str, student: str = STUDENT, sequence_len: int = 4096) -> str:
    """An Axolotl config (YAML) that trains `student` on the published dataset folder `dataset`."""
    return f"""base_model: {student}
chat_template: tokenizer_default
eot_tokens: ["<|im_end|>"]  # needed: see above
datasets:
  - path: {dataset}
    split: train
    type: chat_template
    field_messages: messages
    message_property_mappings: {{role: role, content: content}}
    roles_to_train: ["assistant"]  # system and user turns carry no train_detail
    message_field_training_detail: train_detail
    train_on_eos: turn
train_on_inputs: false
sequence_len: {sequence_len}
output_dir: ./sft-model"""


def trl_section(dataset: str, student: str = STUDENT) -> str:
    """TRL's `SFTTrainer` does not read `train_detail`: pre-tokenize with `distillery export`."""
    return f"""TRL's `SFTTrainer` does not read `train_detail`: pre-tokenize the rows with the student's
tokenizer (a hub name, a folder or a `.gguf` file). Labels are -100 wherever `train_detail` says
not to train, and rows over `--max-length` tokens are dropped, never cut. `SFTTrainer` then keeps
those labels as they are.

```bash
distillery export {dataset} --tokenizer {student} --to {dataset}-tokens --max-length 4096
```

```python
{trl_snippet(f"{dataset}-tokens", student, 4096, model=student)}
```"""


def export_card(result: ExportResult) -> str:
    limit = f"{result.max_length} tokens" if result.max_length is not None else "none"
    return (
        _CARD_HEADER
        + f"""{_CARD_MARK}
# Pre-tokenized export of `{result.source.name}`

- source: `{result.source}`
- tokenizer: `{result.tokenizer}`
- rows written: {result.rows}; longest: {result.longest} tokens; trained tokens: {result.trained_tokens}
- max length: {limit}; rows dropped as longer: {result.too_long} (never cut)
- rows dropped with no trained token: {result.untrained}

Columns: `input_ids`, `attention_mask`, `labels` (-100 where not trained: the prompt, the chat
template's scaffolding, executor output, failed first attempts; from the rows' `train_detail`)
and `assistant_masks` (1 where trained, the same mask). TRL 1.16's `SFTTrainer` uses `labels`
as they are; do not set `assistant_only_loss` (it needs a conversational dataset).

```python
{trl_snippet(str(result.path), result.tokenizer, result.max_length)}
```
"""
    )
