"""`distillery export` (flows/training/export.py): a published dataset pre-tokenized for TRL.

Stitched composites (every case with a correct answer, both teacher orders) are published with
the project's own writer, exported with the embedded SmolLM2 GGUF's tokenizer (offline), and fed
to TRL's `SFTTrainer` with a tiny random Llama: the batch the trainer builds must carry exactly
`flows/training/labels.py`'s labels, so the prompt, executor output and failed first attempts get
no loss, and one training step must run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.models.embedded import EMBEDDED_MODEL_NAME
from flows.training.export import ExportError, export_dataset, load_tokenizer
from flows.training.labels import IGNORE_INDEX, tokenize_row


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(EMBEDDED_MODEL_NAME)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    from test_trajectories import PROBLEM, reasoning_answer, tool_answer

    from flows.inputs.prompts import load_prompt
    from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset
    from flows.stages.stitching import stitch_pair
    from schemas.records import Composite

    make = {"tool": tool_answer, "reasoning": reasoning_answer}
    rows = [
        stitch_pair(
            PROBLEM,
            make[first](g1),
            make[second](g2),
            load_prompt("transitions"),
            "Solve it.",
        )
        for first, second in [("tool", "reasoning"), ("reasoning", "tool")]
        for g1, g2 in [(True, True), (True, False), (False, True)]
    ]
    assert all(isinstance(row, Composite) for row in rows)
    folder = tmp_path_factory.mktemp("published") / "composites"
    card = DatasetCardInfo(title="composites", description="Stitched rows.", sections={})
    publish_dataset(folder, rows, features_for(Composite), card)
    return folder


def source_rows(folder: Path) -> list[dict]:
    from flows.publishing.parquet import read_dataset_rows

    return read_dataset_rows(folder)


@pytest.mark.model  # the embedded SmolLM2 GGUF's tokenizer
def test_export_writes_the_labels_of_labels_py_and_a_card(published, smollm2, tmp_path):
    import datasets

    out = tmp_path / "tokens"
    result = export_dataset(published, EMBEDDED_MODEL_NAME, out, tokenizer=smollm2)
    rows = source_rows(published)
    assert (result.rows, result.too_long, result.untrained) == (len(rows), 0, 0)
    exported = datasets.load_dataset(str(out), split="train")
    assert exported.column_names == [
        "input_ids",
        "attention_mask",
        "labels",
        "assistant_masks",
    ]
    for row, got in zip(rows, exported, strict=True):
        expected = tokenize_row(row, smollm2)
        assert {key: got[key] for key in expected} == expected
        assert got["assistant_masks"] == [int(label != IGNORE_INDEX) for label in expected["labels"]]
    card = (out / "README.md").read_text()
    assert str(published) in card and EMBEDDED_MODEL_NAME in card and f"rows written: {len(rows)}" in card
    assert "from trl import SFTConfig, SFTTrainer" in card


@pytest.mark.model  # the embedded SmolLM2 GGUF's tokenizer
def test_rows_over_max_length_are_dropped_and_counted_never_cut(published, smollm2, tmp_path):
    lengths = [len(tokenize_row(row, smollm2)["input_ids"]) for row in source_rows(published)]
    limit = sorted(lengths)[len(lengths) // 2]
    out = tmp_path / "short"
    result = export_dataset(published, EMBEDDED_MODEL_NAME, out, max_length=limit, tokenizer=smollm2)
    assert result.too_long == sum(n > limit for n in lengths) > 0
    assert result.rows == sum(n <= limit for n in lengths) and result.longest <= limit
    import datasets

    kept = sorted(len(ids) for ids in datasets.load_dataset(str(out), split="train")["input_ids"])
    assert kept == sorted(n for n in lengths if n <= limit)  # whole rows, none cut
    assert f"rows dropped as longer: {result.too_long}" in (out / "README.md").read_text()
    # rerunning onto an earlier export replaces it; onto anything else is refused
    export_dataset(published, EMBEDDED_MODEL_NAME, out, tokenizer=smollm2)
    with pytest.raises(ExportError, match="not an earlier export"):
        export_dataset(published, EMBEDDED_MODEL_NAME, published.parent, tokenizer=smollm2)


@pytest.mark.model  # the embedded SmolLM2 GGUF's tokenizer
def test_cli_export(published, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(published),
            "--tokenizer",
            EMBEDDED_MODEL_NAME,
            "--to",
            str(out),
            "--max-length",
            "4096",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("6 rows to ") and (out / "data" / "train-00000-of-00001.parquet").is_file()
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(tmp_path / "nope"),
            "--tokenizer",
            EMBEDDED_MODEL_NAME,
            "--to",
            str(out),
        ],
    )
    assert result.exit_code == 1 and "not a published dataset" in result.output


@pytest.mark.model  # the embedded SmolLM2 GGUF's tokenizer
def test_trl_sft_trainer_trains_exactly_the_exported_labels(published, smollm2, tmp_path):
    pytest.importorskip("trl")
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    out = tmp_path / "tokens"
    export_dataset(published, EMBEDDED_MODEL_NAME, out, tokenizer=smollm2)
    rows = source_rows(published)
    expected = {tuple(e["input_ids"]): (e["labels"], row) for row in rows for e in [tokenize_row(row, smollm2)]}

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    trainer = SFTTrainer(
        model=LlamaForCausalLM(config),
        processing_class=smollm2,
        train_dataset=datasets.load_dataset(str(out), split="train"),
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"),
            max_steps=1,
            per_device_train_batch_size=len(rows),
            max_length=None,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            dataloader_num_workers=0,
        ),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == len(rows)
    seen = set()
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        length = int(mask.sum())
        ids, labels = ids[:length].tolist(), labels.tolist()
        want, row = expected[tuple(ids)]
        assert labels[:length] == want and set(labels[length:]) <= {IGNORE_INDEX}  # padding: no loss
        seen.add(tuple(ids))
        # what gets loss is the trained text of train_detail, then <|im_end|>: not the system
        # prompt or the problem, not executor output, not a failed first attempt
        assistant = row["messages"][-1]
        spans = assistant["train_detail"]
        trained = smollm2.decode([label for label in labels if label != IGNORE_INDEX])
        text = "".join(assistant["content"][s["begin_offset"] : s["end_offset"] + 1] for s in spans if s["train"])
        assert trained == text + "<|im_end|>"
        assert "Solve it." not in trained and row["problem"] not in trained
        assert "ZeroDivisionError" not in trained and "42 <answer>x" not in trained
        if row["case"] == "second_corrects":
            first = assistant["content"][: row["mask_until"]]
            assert first and first not in trained
    assert len(seen) == len(rows)

    metrics = trainer.train().metrics
    assert math.isfinite(metrics["train_loss"]) and trainer.state.global_step == 1


def test_card_sections_show_a_ready_axolotl_config_and_a_runnable_export_and_trl_snippet():
    import ast

    import yaml

    from flows.training.export import card_sections, trl_snippet

    sections = card_sections("out/demo/composites")
    trl = sections["Training with TRL"]
    assert "distillery export out/demo/composites --tokenizer " in trl and "--to out/demo/composites-tokens" in trl
    python = trl.split("```python\n", 1)[1].split("```", 1)[0]
    ast.parse(python)
    assert 'load_dataset("out/demo/composites-tokens", split="train")' in python and "max_length=4096" in python
    ast.parse(trl_snippet("out/x", "t", None))  # no limit: max_length=None, so TRL cuts nothing

    config = yaml.safe_load(sections["Training with Axolotl"].split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config["eot_tokens"] == ["<|im_end|>"] and config["train_on_inputs"] is False
    (dataset,) = config["datasets"]
    assert dataset["path"] == "out/demo/composites" and dataset["type"] == "chat_template"
    assert dataset["message_field_training_detail"] == "train_detail" and dataset["field_messages"] == "messages"
    assert dataset["roles_to_train"] == ["assistant"]
