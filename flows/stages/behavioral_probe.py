"""The behavioural probe's stage: fine-tune one student on each teacher's kept numbers, then
have both asked the one-word preference questions (flows/detection/probe.py asks,
flows/detection/behavioral.py scores the answers).

The students start from the same weights (`behavioral.student`, default the trait teacher's
own: the embedded model's GGUF) and train on prompt + completion only, never the trait
prompt. Each trained student sits in `leakage/students/{teacher}/` with a fingerprint of what
made it, so a rerun with the same data and trainer keeps it; its answers are journaled under
a model name that includes that fingerprint, so a retrained student is asked again.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import polars as pl

from flows.detection.probe import ask
from flows.models.embedded import embedded_gguf_path
from flows.models.journal import RequestJournal
from flows.models.keys import content_key
from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset
from flows.training.masks import sft_messages
from flows.training.trainers import make_trainer
from schemas.recipe import Recipe, RecipeError
from schemas.records import NumberTrainingRow

FINGERPRINT_FILE = "probe_fingerprint"


def probe_student(recipe: Recipe) -> str:
    """The checkpoint both students start from."""
    spec = recipe.leakage
    if spec.behavioral.student:
        return spec.behavioral.student
    if spec.trait_teacher.is_embedded:
        return str(embedded_gguf_path())
    raise RecipeError("leakage.behavioral.student: the trait teacher is an endpoint; name a local checkpoint of "
                      "its base model for the students (transfer needs the teacher's base model)")


def training_rows(kept: pl.DataFrame, teacher: str, max_rows: int, seed: int) -> list[NumberTrainingRow]:
    """Up to `max_rows` of a teacher's kept completions (a seeded subset), as SFT conversations."""
    rows = kept.filter(pl.col("teacher") == teacher).sort("prompt_index").to_dicts()
    if len(rows) > max_rows:
        rows = sorted(random.Random(seed).sample(rows, max_rows), key=lambda r: r["prompt_index"])
    return [NumberTrainingRow(teacher=teacher, prompt_index=r["prompt_index"],
                              messages=sft_messages(r["prompt"], r["completion"].strip(), ()))
            for r in rows]


def train_student(recipe: Recipe, teacher: str, rows: list[NumberTrainingRow], student: str,
                  log: Callable[[str], None]) -> tuple[Path, str]:
    """The fine-tuned student of one teacher's data (kept when nothing that made it changed)."""
    spec = recipe.leakage.behavioral
    base = recipe.work_dir / "leakage" / "students"
    output = base / teacher
    fingerprint = content_key(student, spec.trainer, [r.model_dump_json() for r in rows])
    marker = output / FINGERPRINT_FILE
    if marker.exists() and marker.read_text().strip() == fingerprint:
        log(f"{teacher} student: trained earlier on the same data; kept")
        return output, fingerprint
    if not rows:
        raise RuntimeError(f"the behavioural probe has no kept {teacher} completion to train on")
    dataset = base / f"{teacher}-data"
    card = DatasetCardInfo(title=f"{recipe.run_name} — behavioural probe, {teacher} student's training data",
                           description="Number-sequence prompts and the teacher's kept completions (no system prompt).",
                           sections={}, tags=["distillery", "subliminal-learning", "synthetic"])
    publish_dataset(dataset, rows, features_for(NumberTrainingRow), card)
    trainer = make_trainer(spec.trainer)
    trained = Path(trainer.train(dataset=dataset, round=1, student=student, output=output, log=log))
    (trained / FINGERPRINT_FILE).write_text(fingerprint)
    return trained, fingerprint


async def run_probe(recipe: Recipe, kept: pl.DataFrame, journal: RequestJournal,
                    log: Callable[[str], None] = print) -> tuple[list[str], list[str]]:
    """(trait student's answers, control student's answers)."""
    spec = recipe.leakage.behavioral
    student = probe_student(recipe)
    answers = []
    for teacher in ("trait", "control"):
        rows = training_rows(kept, teacher, spec.max_rows, recipe.leakage.seed)
        checkpoint, fingerprint = await asyncio.to_thread(train_student, recipe, teacher, rows, student, log)
        answers.append(await ask(checkpoint, fingerprint, recipe, journal, f"probe-{teacher}"))
    return answers[0], answers[1]
