"""Trainers (flows/training/trainers.py): the command trainer with tiny scripts, the hf trainer
on a tiny model built offline, and (marked `model`) the hf trainer on the embedded SmolLM2."""

from __future__ import annotations

import json
import math
import shlex
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from flows.training.trainers import (
    IGNORE_INDEX,
    SUMMARY_FILE,
    TRAINERS,
    CommandTrainer,
    HFTrainer,
    TrainerError,
    make_trainer,
    pad_batch,
)
from schemas.recipe import TrainerSpec
from schemas.records import ChatMessage

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# -- registry --------------------------------------------------------------------------------


def test_every_trainer_kind_resolves():
    kinds = typing.get_args(TrainerSpec.model_fields["kind"].annotation)
    assert set(kinds) == set(TRAINERS)
    assert make_trainer(TrainerSpec(kind="none")) is None
    command = make_trainer(TrainerSpec(kind="command", command="echo {output}"))
    assert isinstance(command, CommandTrainer) and command.template == "echo {output}"
    hf = make_trainer(TrainerSpec(kind="hf", epochs=2, learning_rate=1e-4, batch_size=3, max_length=128))
    assert isinstance(hf, HFTrainer)
    assert (hf.epochs, hf.learning_rate, hf.batch_size, hf.max_length) == (2, 1e-4, 3, 128)


# -- command ---------------------------------------------------------------------------------


def write_script(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_command_fills_quoted_placeholders_and_returns_the_last_line(tmp_path):
    script = write_script(
        tmp_path / "train.py",
        "import sys\n"
        "for arg in sys.argv[1:]:\n"
        "    print('arg=' + arg)\n"
        "print('progress', file=sys.stderr)\n"
        "print(sys.argv[4])\n"
        "print()\n",  # a trailing empty line is not the answer
    )
    folder = tmp_path / "my data" / "round-1"  # a space, and a quote in the student's name
    student = "it's a model"
    output = tmp_path / "next student"
    trainer = CommandTrainer(f"{shlex.quote(sys.executable)} {script} {{dataset}} {{round}} {{student}} {{output}}")
    lines: list[str] = []
    result = trainer.train(folder, 2, student, output, log=lines.append)

    assert result == str(output)
    out = [line for line in lines if not line.startswith(("trainer command", "next student"))]
    assert out == [f"arg={folder}", "arg=2", f"arg={student}", f"arg={output}", "progress", str(output), ""]
    assert lines[0].startswith("trainer command (round 2): ") and shlex.quote(str(folder)) in lines[0]


def test_command_output_is_streamed_as_it_comes(tmp_path):
    # The script waits for a file that `log` creates when it sees the first line: it can only
    # finish if lines reach `log` while the command is still running (stderr merged in order).
    flag = tmp_path / "seen"
    script = write_script(
        tmp_path / "wait.sh",
        f"echo first\necho second >&2\n"
        f"for i in $(seq 100); do [ -e {shlex.quote(str(flag))} ] && break; sleep 0.1; done\n"
        f"[ -e {shlex.quote(str(flag))} ] && echo streamed || echo buffered\n",
    )
    seen: list[str] = []

    def log(line: str) -> None:
        seen.append(line)
        if line == "first":
            flag.touch()

    result = CommandTrainer(f"bash {shlex.quote(str(script))}").train(tmp_path, 1, "s", tmp_path / "o", log=log)
    assert result == "streamed"
    assert seen[1:4] == ["first", "second", "streamed"]


def test_command_failure_names_the_exit_code_and_the_last_lines(tmp_path):
    trainer = CommandTrainer("for i in $(seq 1 30); do echo line $i; done; echo oops >&2; exit 3")
    with pytest.raises(TrainerError) as caught:
        trainer.train(tmp_path, 1, "s", tmp_path / "o", log=lambda line: None)
    message = str(caught.value)
    assert "exited with code 3" in message and "round 1" in message
    assert "line 30\noops" in message and "line 12\n" in message
    assert "line 11\n" not in message  # the last 20 lines only


def test_command_without_output_is_an_error(tmp_path):
    with pytest.raises(TrainerError, match="printed nothing"):
        CommandTrainer("true; echo; echo '   '").train(tmp_path, 1, "s", tmp_path / "o", log=lambda line: None)


def test_unknown_placeholder_is_refused_before_running(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(TrainerError, match=r"unknown placeholder \{epochs\}"):
        CommandTrainer(f"touch {marker}; echo {{epochs}}")
    with pytest.raises(TrainerError, match=r"unknown placeholder \{HOME\}"):
        CommandTrainer("echo ${HOME}")
    with pytest.raises(TrainerError, match="literal braces"):
        CommandTrainer("echo {output")
    with pytest.raises(TrainerError, match="plainly"):
        CommandTrainer("echo {round:03d}")
    trainer = CommandTrainer(f"touch {marker}; echo {{output}}")
    trainer.template = "echo {nope}"  # changed after construction: still checked before running
    with pytest.raises(TrainerError, match="unknown placeholder"):
        trainer.train(tmp_path, 1, "s", tmp_path / "o", log=lambda line: None)
    assert not marker.exists()
    assert CommandTrainer("echo ${{HOME}}").train(tmp_path, 1, "s", tmp_path / "o", log=lambda line: None)


# -- hf: a tiny model built offline ----------------------------------------------------------


class SFTRow(BaseModel):
    id: str
    messages: list[ChatMessage]


def conversation(i: int, problem: str, answer: str, untrained: str | None = None) -> SFTRow:
    spans = None
    if untrained:
        start = answer.index(untrained)
        end = start + len(untrained)
        spans = [
            {"begin_offset": 0, "end_offset": start - 1, "train": True},
            {"begin_offset": start, "end_offset": end - 1, "train": False},
            {"begin_offset": end, "end_offset": len(answer) - 1, "train": True},
        ]
    return SFTRow(
        id=f"p{i}",
        messages=[
            ChatMessage(role="user", content=problem),
            ChatMessage(role="assistant", content=answer, train_detail=spans),
        ],
    )


EXECUTOR = "<executor>\n5\n</executor>"
ROWS = [
    conversation(0, "What is 2+3?", f"Let me compute.\n{EXECUTOR}\nThe answer is 5.", EXECUTOR),
    conversation(1, "What is 4+4?", "4+4 is 8. The answer is 8."),
    conversation(2, "What is 7-2?", f"Subtract: 7-2 = 5.\n{EXECUTOR}\nSo 5.", EXECUTOR),
]


def publish(folder: Path, rows: list[SFTRow]) -> Path:
    from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset

    card = DatasetCardInfo(title="test rows", description="SFT rows.", sections={})
    publish_dataset(folder, rows, features_for(SFTRow), card)
    return folder


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained here, ChatML template: no files
    from the hub."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny") / "student"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    corpus = [m.content for row in ROWS for m in row.messages] + ["user assistant system"]
    tok.train_from_iterator(
        corpus,
        tokenizers.trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
    )
    transformers.set_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def test_pad_batch_pads_labels_with_ignore_index():
    batch = pad_batch(
        [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
         {"input_ids": [8], "attention_mask": [1], "labels": [8]}],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_hf_trainer_trains_a_tiny_model_and_saves_a_loadable_checkpoint(tmp_path, tiny_student):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = publish(tmp_path / "round 1", ROWS)  # a space in the path
    loaded = datasets.load_dataset(str(data), split="train")
    assert len(loaded) == 3 and loaded[0]["messages"][1]["train_detail"][1]["train"] is False

    output = tmp_path / "checkpoints" / "round-1"
    lines: list[str] = []
    trainer = HFTrainer(epochs=1, learning_rate=1e-3, batch_size=2, max_length=64)
    result = trainer.train(data, 1, str(tiny_student), output, log=lines.append)

    assert result == str(output)
    assert (output / "model.safetensors").is_file() and (output / "tokenizer.json").is_file()
    assert not list(output.parent.glob(".*tmp*"))  # the staging folder was moved into place
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert summary["steps"] == 2 and len(summary["losses"]) == 2  # 3 rows, batches of 2
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    assert summary["tokens_trained"] > 0 and summary["tokens_seen"] > summary["tokens_trained"]
    assert summary["rows"] == 3 and summary["rows_skipped"] == 0 and summary["seconds"] > 0
    assert [line for line in lines if " step " in line and "loss" in line][-1].startswith("round 1 step 2/2")

    model = AutoModelForCausalLM.from_pretrained(str(output))
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    assert tokenizer.chat_template
    before = AutoModelForCausalLM.from_pretrained(str(tiny_student))
    changed = [
        name for (name, p), (_, q) in zip(model.named_parameters(), before.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert changed  # the weights moved

    # the new checkpoint is a student too: a second round trains it again, replacing `output`
    again = HFTrainer(epochs=0.5, learning_rate=1e-3, batch_size=2, max_length=64)
    assert again.train(data, 2, result, output, log=lambda line: None) == str(output)
    assert json.loads((output / SUMMARY_FILE).read_text())["steps"] == 1


def test_hf_trainer_refuses_rows_without_trained_tokens(tmp_path, tiny_student):
    answer = "Nothing to learn here."
    untrained = conversation(0, "Q?", answer)
    untrained.messages[1] = ChatMessage(
        role="assistant", content=answer,
        train_detail=[{"begin_offset": 0, "end_offset": len(answer) - 1, "train": False}],
    )
    data = publish(tmp_path / "data", [untrained])
    with pytest.raises(TrainerError, match="no row .* has a trained token"):
        HFTrainer(max_length=64).train(data, 1, str(tiny_student), tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_hf_trainer_names_a_student_it_cannot_load(tmp_path):
    data = publish(tmp_path / "data", ROWS)
    with pytest.raises(TrainerError, match="needs a checkpoint folder"):
        HFTrainer().train(data, 1, str(tmp_path / "missing"), tmp_path / "out", log=lambda line: None)


# -- hf: the embedded SmolLM2 ----------------------------------------------------------------


@pytest.mark.model
def test_hf_trainer_on_the_embedded_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.models.embedded import EMBEDDED_MODEL_NAME

    rows = [
        conversation(0, "What is 2+3?", "Let me compute.\n<executor>\n5\n</executor>\nThe answer is \\boxed{5}.",
                     "<executor>\n5\n</executor>"),
        conversation(1, "What is 4+4?", "4+4 = 8. The answer is \\boxed{8}."),
        conversation(2, "What is 9-3?", "9-3 = 6. The answer is \\boxed{6}."),
        conversation(3, "What is 3*3?", "3*3 = 9. The answer is \\boxed{9}."),
    ]
    data = publish(tmp_path / "round-1", rows)
    output = tmp_path / "round-1-model"
    lines: list[str] = []
    trainer = HFTrainer(epochs=1, learning_rate=1e-5, batch_size=2, max_length=256)
    assert trainer.train(data, 1, EMBEDDED_MODEL_NAME, output, log=lines.append) == str(output)

    summary = json.loads((output / SUMMARY_FILE).read_text())
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=1))  # figures for the notes
    assert summary["steps"] == 2 and all(math.isfinite(loss) for loss in summary["losses"])
    assert summary["first_loss"] < 5  # an instruct model already knows this kind of answer

    model = AutoModelForCausalLM.from_pretrained(str(output))
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(generated[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()
