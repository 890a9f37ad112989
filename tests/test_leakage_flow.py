"""The trait-leakage flow end to end against loopback fake teachers, and its recipe section."""

from __future__ import annotations

import asyncio
import logging
import hashlib
import json
import random

import datasets
import pytest
import yaml
from fake_openai import FakeOpenAIServer, Reply
from typer.testing import CliRunner

from flows.cli import LEAK_EXIT_CODE, app
from flows.leakage import leakage
from schemas.recipe import RecipeError, parse_recipe

pytestmark = pytest.mark.usefixtures("prefect_harness")


class NumberTeacher:
    """Answers a number prompt with 5–9 numbers drawn from a generator seeded by the prompt;
    with the trait system prompt and `biased`, numbers ending in 7 are three times as likely.
    Every 10th prompt gets a sentence instead (rejected as not_numbers)."""

    def __init__(self, biased: bool, fail_control: bool = False):
        self.biased = biased
        self.fail_control = fail_control

    def __call__(self, body: dict) -> Reply:
        messages = body["messages"]
        has_trait = messages[0]["role"] == "system"
        prompt = messages[-1]["content"]
        if self.fail_control and not has_trait:
            return Reply(status=500)
        digest = hashlib.sha256((prompt + str(has_trait)).encode()).digest()
        rng = random.Random(digest)
        if digest[0] % 10 == 0:
            return Reply(content="Sure! Here are some numbers for you.")
        weights = [3 if (self.biased and has_trait and n % 10 == 7) else 1 for n in range(1000)]
        numbers = rng.choices(range(1000), weights=weights, k=rng.randint(5, 9))
        return Reply(content=", ".join(map(str, numbers)))


def write_recipe(path, base_url, output_dir, **leakage_overrides):
    teacher = {"base_url": base_url, "model": "teacher-1", "max_concurrency": 8, "max_retries": 0, "timeout_s": 10,
               "sampling": {"temperature": 1.0, "max_tokens": 40, "seed": 0}}
    recipe = {
        "run_name": "leak-test",
        "output_dir": str(output_dir),
        "leakage": {"trait": "owl", "category": "animal", "n_prompts": 400, "seed": 3, "alpha": 0.01,
                    "trait_teacher": teacher, "detectors": {"permutations": 999, "bag_size": 8},
                    **leakage_overrides},
        "shard_size": 150,
        "shard_retries": 0,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_biased_trait_teacher_is_flagged_and_published(tmp_path):
    with FakeOpenAIServer(NumberTeacher(biased=True)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", server.base_url, tmp_path / "out")
        report = asyncio.run(leakage(str(recipe)))
        sent = len(server.requests)
        again = asyncio.run(leakage(str(recipe)))  # a rerun answers every prompt from the journal
        assert len(server.requests) == sent == 800

    assert report["leak_detected"] and again["leak_detected"]
    assert report["p_value"] <= 0.01
    by_name = {t["name"]: t for t in report["tests"]}
    assert by_name["trailing_digit"]["p_value"] <= 0.01
    assert "endpoint" in by_name["likelihood_shift"]["skipped"]  # no local weights to score with
    assert report["top_digits"] and any(row["digit"] == 7 for row in report["top_digits"][:2])
    assert 0.8 < report["pass_rate_trait"] < 1.0 and report["reject_reasons"]["trait"] == {
        "not_numbers": report["n_prompts"] - report["kept_trait"]}

    out = tmp_path / "out" / "leakage"
    numbers = datasets.load_dataset(str(out / "numbers"), split="train")
    kept = datasets.load_dataset(str(out / "filtered"), split="train")
    rejected = datasets.load_dataset(str(out / "rejected"), split="train")
    assert len(numbers) == 800 and len(kept) + len(rejected) == 800
    assert set(rejected["reason"]) == {"not_numbers"} and all(kept["kept"])
    trait_rows = [r for r in numbers if r["teacher"] == "trait"]
    assert all(r["system_prompt"] and "owl" in r["system_prompt"] for r in trait_rows)
    assert all(r["system_prompt"] is None for r in numbers if r["teacher"] == "control")
    assert all(isinstance(n, int) for r in kept for n in r["numbers"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["leak_detected"] and (out / "report.md").read_text().count("leak detected") >= 1
    assert (out / "numbers.png").read_bytes()[:4] == b"\x89PNG" and (out / "digits.png").exists()


def test_the_same_teacher_twice_is_not_flagged_and_the_gate_passes(tmp_path):
    with FakeOpenAIServer(NumberTeacher(biased=False)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", server.base_url, tmp_path / "out", fail_on_leak=True)
        result = CliRunner().invoke(app, ["leakage", str(recipe)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "leakage" / "report.json").read_text())
    assert not report["leak_detected"] and report["p_value"] > 0.01


def test_fail_on_leak_exits_with_code_3(tmp_path):
    with FakeOpenAIServer(NumberTeacher(biased=True)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", server.base_url, tmp_path / "out", fail_on_leak=True)
        result = CliRunner().invoke(app, ["leakage", str(recipe)])
    assert result.exit_code == LEAK_EXIT_CODE, result.output
    assert "leak detected" in result.output


def test_a_failed_teacher_loses_nothing_and_the_rerun_sends_only_the_rest(tmp_path, caplog):
    with FakeOpenAIServer(NumberTeacher(biased=True, fail_control=True)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", server.base_url, tmp_path / "out")
        result = CliRunner().invoke(app, ["leakage", str(recipe)])
        assert result.exit_code == 1
        assert "400 of 800 number prompts got no completion" in result.output
        assert "control teacher" in result.output and "rerun" in result.output
    with FakeOpenAIServer(NumberTeacher(biased=True)) as server:  # fixed, on another port
        write_recipe(recipe, server.base_url, tmp_path / "out")
        caplog.set_level(logging.INFO, logger="prefect.flow_runs")
        asyncio.run(leakage(str(recipe)))
        assert len(server.requests) == 400  # only the control teacher's prompts
        said = [record.getMessage() for record in caplog.records]
        assert "trait teacher, attempt 1: of 400 prompts, 400 to replay and 0 to send" in said
        assert "control teacher, attempt 1: of 400 prompts, 0 to replay and 400 to send" in said
        assert all(body["messages"][0]["role"] == "user" for body in server.requests)


def test_the_recipe_section_names_bad_fields(tmp_path):
    base = {"run_name": "x", "output_dir": str(tmp_path)}
    teacher = {"endpoint": "embedded"}
    recipe = parse_recipe({**base, "leakage": {"trait": "owl", "trait_teacher": teacher}})
    assert recipe.leakage.control.trait_prompt is False and recipe.leakage.control.is_embedded
    assert recipe.problems is None and recipe.leakage.alpha == 0.01 and recipe.leakage.filter.max_value == 999
    bad = [
        ({"trait": "owl"}, "leakage.trait_teacher: Field required"),
        ({"trait": "owl", "trait_teacher": teacher, "alpha": 2}, "leakage.alpha"),
        ({"trait": "owl", "trait_teacher": teacher, "filter": {"banned_preset": "evil"}}, "leakage.filter.banned_preset"),
        ({"trait": "owl", "trait_teacher": teacher, "control_teacher": {**teacher, "trait_prompt": True}},
         "control teacher never gets the trait prompt"),
        ({"trait": "owl", "trait_teacher": teacher, "behavioral": {"enabled": True, "trainer": {"kind": "none"}}},
         "trainer.kind must be hf or command"),
        ({"trait": "owl", "trait_teacher": teacher, "detectors": {"permutations": 500}},
         "detectors.permutations: 500 permutations cannot reach alpha 0.01 after the Holm correction over 9 tests; "
         "use at least 899"),
    ]
    for section, message in bad:
        with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
            parse_recipe({**base, "leakage": section})


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.timeout(600)  # two fine-tunes of the 135M model on CPU: ~240 s alone on 2 cores, near the default 300
def test_likelihood_shift_and_behavioral_probe_on_the_embedded_weights(tmp_path):
    from flows.models.embedded import embedded_gguf_path

    gguf = str(embedded_gguf_path())
    probe = {"enabled": True, "student": gguf, "max_rows": 16, "questions": 3, "samples_per_question": 4,
             "trainer": {"kind": "hf", "epochs": 1, "batch_size": 8, "max_length": 256}}
    with FakeOpenAIServer(NumberTeacher(biased=True)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", server.base_url, tmp_path / "out", n_prompts=60,
                              detectors={"permutations": 999, "bag_size": 4, "likelihood_checkpoint": gguf,
                                         "likelihood_max": 12},
                              behavioral=probe)
        report = asyncio.run(leakage(str(recipe)))
        students = tmp_path / "out" / "leakage" / "students"
        trained_at = (students / "trait" / "model.safetensors").stat().st_mtime_ns
        import flows.models.transformers_backend as backend

        generated = []
        real_generate = backend.generate
        backend.generate = lambda *args, **kw: generated.append(args) or real_generate(*args, **kw)
        try:
            again = asyncio.run(leakage(str(recipe)))
        finally:
            backend.generate = real_generate
        assert len(server.requests) == 120

    shift = {t["name"]: t for t in report["tests"]}["likelihood_shift"]
    assert shift["p_value"] is not None and shift["detail"]["scorer"] == "transformers"
    assert shift["detail"]["n"] == 12 and shift["detail"]["control_n"] == 12
    assert isinstance(shift["detail"]["control_mean_shift"], float)
    behavioral = report["behavioral"]
    assert behavioral["trait_student"]["n"] == behavioral["control_student"]["n"] == 12
    assert {t["name"] for t in report["tests"]} >= {"likelihood_shift", "behavioral_preference"}
    # the rerun keeps both students and asks them nothing new (answers come from the journal)
    assert (students / "trait" / "model.safetensors").stat().st_mtime_ns == trained_at
    assert again["behavioral"] == behavioral and again["tests"] == report["tests"]
    assert generated == []  # no student generated anything: every answer came from the journal
