"""Trainers: how a self-distillation round turns its published dataset into the next student.

Picked by `TrainerSpec.kind` through `TRAINERS` / `make_trainer` (`none` gives no trainer:
the job runs one round). Every trainer has the same call:

    next_student = trainer.train(dataset, round, student, output, log=print)

`dataset` is the round's published dataset folder (`datasets.load_dataset(folder)` reads
it; rows carry `messages` with `train_detail` spans on assistant turns); `student` is the
current student, a checkpoint folder or `EMBEDDED_MODEL_NAME` (the embedded SmolLM2 GGUF);
`output` is where the next checkpoint should go; `log` receives progress lines. The return
value names the next student: a checkpoint folder or a model name.

- `CommandTrainer`: any shell line (TRL, Axolotl, a cluster submit script...). The
  placeholders `{dataset}`, `{round}`, `{student}`, `{output}` are filled in shell-quoted;
  `{{`/`}}` are literal braces (so `${HOME}` is written `${{HOME}}`). stdout and stderr are
  merged and streamed to `log` line by line; the last non-empty line printed names the next
  student, so print the checkpoint path last.
- `HFTrainer`: transformers SFT for small models on CPU, in process, with a plain torch
  loop, on a student loaded by flows/models/checkpoints.py (a GGUF's weights unpacked).
  Labels come from `tokenize_dataset` (flows/training/labels.py), so only the
  `train: true` spans (and the end-of-turn token after them) carry loss; padding is -100.
  The checkpoint (safetensors + tokenizer + `train_summary.json`) is written to a staging
  folder and moved to `output` only when complete.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import signal
import string
import subprocess
import time
from builtins import round as _round  # `round` is a parameter name below
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from schemas.recipe import TrainerSpec

Log = Callable[[str], None]
PLACEHOLDERS = ("dataset", "round", "student", "output")
SUMMARY_FILE = "train_summary.json"
IGNORE_INDEX = -100  # as flows.training.labels.IGNORE_INDEX (not imported: keeps this import light)


class TrainerError(RuntimeError):
    """A trainer could not produce the next student; the message says why."""


class Trainer(Protocol):
    def train(self, dataset: Path, round: int, student: str, output: Path, log: Log = print) -> str: ...


# -- command -------------------------------------------------------------------------------


def check_template(template: str) -> None:
    """Raise TrainerError for a placeholder other than {dataset} {round} {student} {output}."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:  # a lone "{" or "}"
        raise TrainerError(
            f"trainer command template {template!r}: {exc} (write {{{{ and }}}} for literal braces)"
        ) from None
    allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    for name, spec, conversion in fields:
        if name not in PLACEHOLDERS:
            shown = "{" + name + "}" if name else "{}"
            raise TrainerError(
                f"trainer command template: unknown placeholder {shown} (known: {allowed}; "
                "write {{ and }} for literal braces, e.g. ${{HOME}})"
            )
        if spec or conversion:
            raise TrainerError(f"trainer command template: write {{{name}}} plainly, without a format or conversion")


@dataclass
class CommandTrainer:
    """Runs a shell template with bash; its last non-empty output line names the next student."""

    template: str
    tail_lines: int = 20  # output lines quoted in the error of a failed command

    def __post_init__(self) -> None:
        check_template(self.template)

    def command(self, dataset: Path, round: int, student: str, output: Path) -> str:
        check_template(self.template)
        values = {"dataset": str(dataset), "round": str(round), "student": str(student), "output": str(output)}
        return self.template.format(**{key: shlex.quote(value) for key, value in values.items()})

    def train(self, dataset: Path, round: int, student: str, output: Path, log: Log = print) -> str:
        command = self.command(dataset, round, student, output)
        log(f"trainer command (round {round}): {command}")
        tail: deque[str] = deque(maxlen=self.tail_lines)
        last = ""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # python scripts stream instead of buffering
        process = subprocess.Popen(
            ["bash", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", bufsize=1, env=env, start_new_session=True,
        )
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.rstrip("\r\n")
                log(line)
                tail.append(line)
                if line.strip():
                    last = line.strip()
            code = process.wait()
        finally:
            if process.poll() is None:  # interrupted (or `log` raised): stop the whole command
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            shown = "\n".join(tail) or "(no output)"
            raise TrainerError(
                f"trainer command {how} (round {round}): {command}\n--- last {len(tail)} output lines ---\n{shown}"
            )
        if not last:
            raise TrainerError(
                f"trainer command printed nothing (round {round}): {command}\n"
                "its last output line must name the next student (a checkpoint folder or model name)"
            )
        log(f"next student (round {round}): {last}")
        return last


# -- hf ------------------------------------------------------------------------------------


def load_student(student: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a student, in float32 on the CPU, ready to train: a GGUF is
    dequantized (`load_pretrained`, flows/models/checkpoints.py)."""
    from flows.models.checkpoints import CheckpointError, load_pretrained

    try:
        model, tokenizer = load_pretrained(student, "float32", trainable=True)
    except CheckpointError as exc:
        raise TrainerError(f"student {student!r}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise TrainerError(f"student {student!r}: the hf trainer needs a fast tokenizer (character offsets)")
    if not tokenizer.chat_template:
        raise TrainerError(f"student {student!r}: its tokenizer has no chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def pad_batch(rows: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: `pad_id` in input_ids, 0 in attention_mask, -100 in labels."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)

    def padded(key: str, value: int) -> Any:
        return torch.tensor([list(row[key]) + [value] * (width - len(row[key])) for row in rows], dtype=torch.long)

    return {
        "input_ids": padded("input_ids", pad_id),
        "attention_mask": padded("attention_mask", 0),
        "labels": padded("labels", IGNORE_INDEX),
    }


def _replace_folder(staging: Path, output: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)


@dataclass
class HFTrainer:
    """Full fine-tuning of a small causal LM on the round's rows, loss on trained spans only."""

    epochs: float = 1.0
    learning_rate: float = 5e-5
    batch_size: int = 4
    max_length: int = 2048
    # torch CPU threads while training. On a machine whose cores are busy with other work,
    # fewer threads than cores is much faster (OpenMP threads wait on each other): set
    # DISTILLERY_TRAIN_THREADS=1 there.
    threads: int = field(default_factory=lambda: int(os.environ.get("DISTILLERY_TRAIN_THREADS", "2")))
    seed: int = 0  # row order and initialisation of anything random
    max_steps: int | None = None  # stop early (tests, demos); None: epochs decide
    max_grad_norm: float = 1.0

    def train(self, dataset: Path, round: int, student: str, output: Path, log: Log = print) -> str:
        import datasets
        import torch

        from flows.training.labels import tokenize_dataset

        started = time.monotonic()
        output = Path(output)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            rows = datasets.load_dataset(str(dataset), split="train")
            if len(rows) == 0:
                raise TrainerError(f"round {round}: dataset {dataset} has no rows to train on")
            log(f"round {round}: loading student {student}")
            model, tokenizer = load_student(student)
            loaded = time.monotonic()
            log(f"round {round}: student loaded in {loaded - started:.1f}s")
            encoded = [
                row for row in tokenize_dataset(rows, tokenizer, max_length=self.max_length)
                if any(label != IGNORE_INDEX for label in row["labels"])
            ]
            skipped = len(rows) - len(encoded)
            if skipped:
                log(f"round {round}: {skipped} of {len(rows)} rows have no trained token within "
                    f"max_length {self.max_length}; skipped")
            if not encoded:
                raise TrainerError(f"round {round}: no row of {dataset} has a trained token (train_detail, max_length)")
            summary = self._fit(model, tokenizer, encoded, round, log)
            output.parent.mkdir(parents=True, exist_ok=True)
            staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                model.save_pretrained(str(staging))
                tokenizer.save_pretrained(str(staging))
                summary.update(
                    round=round, student=str(student), dataset=str(dataset), rows=len(rows), rows_skipped=skipped,
                    epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                    max_length=self.max_length, threads=self.threads, load_seconds=_round(loaded - started, 2),
                    seconds=_round(time.monotonic() - started, 2),
                )
                (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
                _replace_folder(staging, output)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        finally:
            torch.set_num_threads(previous_threads)
        log(f"round {round}: saved {output} ({summary['steps']} steps, loss {summary['first_loss']:.4f} -> "
            f"{summary['last_loss']:.4f}, {summary['seconds']:.1f}s)")
        return str(output)

    def _fit(self, model: Any, tokenizer: Any, encoded: list[dict], round: int, log: Log) -> dict[str, Any]:
        import torch

        torch.manual_seed(self.seed)
        per_epoch = math.ceil(len(encoded) / self.batch_size)
        total = max(1, math.ceil(self.epochs * per_epoch))
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        try:  # the fused CPU kernel: one pass over the weights instead of several (~4x faster here)
            optimizer = torch.optim.AdamW(model.parameters(), lr=self.learning_rate, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):
            optimizer = torch.optim.AdamW(model.parameters(), lr=self.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)  # linear to 0
        order = random.Random(self.seed)
        model.train()
        losses: list[float] = []
        tokens_trained = tokens_seen = 0
        fit_started = time.monotonic()
        step = 0
        while step < total:
            indices = list(range(len(encoded)))
            order.shuffle(indices)
            for first in range(0, len(indices), self.batch_size):
                if step >= total:
                    break
                batch = pad_batch([encoded[i] for i in indices[first:first + self.batch_size]], tokenizer.pad_token_id)
                step_started = time.monotonic()
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise TrainerError(f"round {round}: loss is {loss.item()} at step {step + 1}; stopping")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
                rate = schedule.get_last_lr()[0]
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss.item())
                trained = int((batch["labels"] != IGNORE_INDEX).sum())
                tokens_trained += trained
                tokens_seen += int(batch["attention_mask"].sum())
                log(f"round {round} step {step}/{total} epoch {step / per_epoch:.2f} loss {losses[-1]:.4f} "
                    f"lr {rate:.2e} trained tokens {trained} ({time.monotonic() - step_started:.1f}s)")
        model.eval()
        fit_seconds = time.monotonic() - fit_started
        return {
            "steps": step,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "losses": [_round(value, 5) for value in losses],
            "tokens_trained": tokens_trained,
            "tokens_seen": tokens_seen,
            "train_seconds": _round(fit_seconds, 2),
            "seconds_per_step": _round(fit_seconds / step, 3),
        }


# -- registry ------------------------------------------------------------------------------

TRAINERS: dict[str, Callable[[TrainerSpec], Trainer | None]] = {
    "none": lambda spec: None,
    "command": lambda spec: CommandTrainer(spec.command or ""),
    "hf": lambda spec: HFTrainer(
        epochs=spec.epochs, learning_rate=spec.learning_rate, batch_size=spec.batch_size, max_length=spec.max_length
    ),
}


def make_trainer(spec: TrainerSpec) -> Trainer | None:
    """The trainer `spec.kind` names; None for `none` (no next student: one round)."""
    try:
        factory = TRAINERS[spec.kind]
    except KeyError:
        raise TrainerError(f"unknown trainer kind {spec.kind!r} (known: {', '.join(TRAINERS)})") from None
    return factory(spec)
