"""The `distillery` command.

    distillery run RECIPE.yaml      run the DualDistill flow; rerun the same recipe to resume
                                    (exit code 4 when a `budget:` cap stopped it: raise the cap, rerun)
    distillery self-distill RECIPE  run self-distillation rounds on the student's own samples
    distillery leakage RECIPE.yaml  check whether a teacher's trait leaks into number sequences
                                    (exit code 3 on a leak with leakage.fail_on_leak: true)
    distillery grade FILE.jsonl     re-grade lines with `answer` and `response` (JSONL out)
    distillery export DATASET --tokenizer T --to OUT   pre-tokenize a dataset for TRL's SFTTrainer
    distillery check RECIPE.yaml    validate a recipe and count its problems, calling no model
    distillery plan RECIPE.yaml     requests, tokens, time and cost per role before a run (a pilot if asked)
    distillery status OUTPUT_DIR    progress of a run (running or finished, started anywhere)
    distillery publish RECIPE.yaml  push a finished run's datasets to the Hugging Face Hub (again)
    distillery serve RECIPE.yaml    serve the flow as a deployment of the configured Prefect server
    distillery deploy RECIPE.yaml   register a deployment on the server, for a work pool's workers
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from flows.orchestration.tables import (
    print_audit,
    print_leakage,
    print_plan,
    print_rounds,
    print_summary,
    results_console,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Synthesise distillation data for small reasoning models.")
console = Console(stderr=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


BUDGET_EXIT_CODE = 4  # a `budget:` cap stopped the run; everything answered is journaled
LOGS_HELP = "print Prefect's task and flow run log lines instead of progress bars"


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML, e.g. recipes/demo.yaml"),
    logs: bool = typer.Option(False, "--logs", help=LOGS_HELP),
) -> None:
    """Run a DualDistill recipe: teachers → grade → stitch → Parquet datasets."""
    result = _run_job(recipe, "dualdistill", logs)
    print_summary(result)
    _name_report(result)


def _name_report(result: dict) -> None:
    """A run's last line: its report.html, one page that opens offline in a browser."""
    if result.get("report_html"):
        results_console().print(f"[bold]report.html[/]: {escape(result['report_html'])}", highlight=False,
                                soft_wrap=True)


def _run_job(recipe: Path, job: str, logs: bool = False) -> dict:
    """Validate the recipe for `job` (before Prefect starts), run its flow with a progress
    bar per stage, and turn every failure into one clear message and exit code 1."""
    from schemas.recipe import RecipeError, load_recipe

    try:
        loaded = load_recipe(recipe, job=job)
    except RecipeError as exc:
        _fail(str(exc))
    from flows.models.budget import BudgetReached
    from flows.orchestration import run_lock
    from flows.orchestration.terminal import ProgressBars

    try:
        # taken before Prefect loads, so a second run fails at once; the flow, in this process, re-enters it
        with run_lock.holding(loaded.state_dir, job, hand_over=True), \
                contextlib.nullcontext() if logs else ProgressBars(loaded.state_dir, console):
            return asyncio.run(_load_flow(job, logs)(str(recipe)))  # the flow, called as a worker calls it
    except run_lock.RunLocked as exc:
        _fail(str(exc))
    except BudgetReached as exc:
        console.print(f"[bold yellow]stopped:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=BUDGET_EXIT_CODE) from None
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear message and exit 1
        _fail(f"{type(exc).__name__}: {exc}")


def _load_flow(job: str, logs: bool):  # noqa: ANN202 - a Prefect flow
    from flows.orchestration.terminal import quiet_prefect_console, quiet_third_party

    if not logs:
        quiet_third_party()  # before the flow's imports: datasets, huggingface_hub and tqdm read it as they load
    if job == "dualdistill":
        from flows.dualdistill import dualdistill as job_flow
    elif job == "leakage":
        from flows.leakage import leakage as job_flow
    else:
        from flows.self_distill import self_distill as job_flow
    from prefect.settings import PREFECT_API_URL

    if not logs:
        quiet_prefect_console()
    if not PREFECT_API_URL.value():
        console.print("no Prefect server configured (PREFECT_API_URL): starting a temporary one for this run, "
                      "which costs several seconds before the flow starts; `prefect server start` and "
                      "`export PREFECT_API_URL=http://127.0.0.1:4200/api` skip that and keep the runs in its UI",
                      highlight=False, soft_wrap=True)
    return job_flow


@app.command("self-distill")
def self_distill(
    recipe: Path = typer.Argument(..., help="recipe YAML, e.g. recipes/self_distill_demo.yaml"),
    logs: bool = typer.Option(False, "--logs", help=LOGS_HELP),
) -> None:
    """Sample K answers per problem from the student, build verification / correction
    examples by the beta rules, publish each round, and train the next student."""
    result = _run_job(recipe, "self_distill", logs)
    print_rounds(result)
    _name_report(result)


LEAK_EXIT_CODE = 3


@app.command()
def leakage(
    recipe: Path = typer.Argument(..., help="recipe YAML, e.g. recipes/leakage_demo.yaml"),
    logs: bool = typer.Option(False, "--logs", help=LOGS_HELP),
) -> None:
    """Number sequences from a trait teacher and a control teacher → the study's filter →
    statistical detectors (and the behavioural probe when asked) → a verdict and a report.
    Exits with code 3 when a leak is detected and `leakage.fail_on_leak` is true."""
    report = _run_job(recipe, "leakage", logs)
    print_leakage(report)
    _name_report(report)
    from schemas.recipe import load_recipe

    if report["leak_detected"] and load_recipe(recipe, job="leakage").leakage.fail_on_leak:
        console.print("[bold red]leak detected[/] and fail_on_leak is set: exit code 3")
        raise typer.Exit(code=LEAK_EXIT_CODE)


@app.command()
def grade(
    file: Path = typer.Argument(..., help="JSONL with `answer` (gold) and `response` per line; - for stdin"),
    audit: bool = typer.Option(False, "--audit", help="list where our grader and math-verify alone disagree"),
) -> None:
    """Print each line back with `correct`, `extracted` and `reason` added; with --audit,
    the lines that math-verify alone grades the other way, grouped by our reason."""
    from flows.grading import GradeInputError, audit_jsonl, grade_jsonl

    try:
        if str(file) == "-":
            lines, source = sys.stdin, "<stdin>"
        else:
            lines, source = file.open(encoding="utf-8"), str(file)
        if audit:
            print_audit(audit_jsonl(lines, source=source))
            return
        for line in grade_jsonl(lines, source=source):
            sys.stdout.write(line + "\n")
    except GradeInputError as exc:
        _fail(str(exc))
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{file}: {getattr(exc, 'strerror', None) or exc}")


@app.command()
def export(
    dataset: Path = typer.Argument(..., help="a published dataset folder, e.g. out/demo/composites"),
    tokenizer: str = typer.Option(..., help="a name or folder for AutoTokenizer, a .gguf file or the embedded model"),
    to: Path = typer.Option(..., "--to", help="the folder to write (replaced only if it is an earlier export)"),
    max_length: int | None = typer.Option(None, help="drop (never cut) rows longer than this many tokens"),
) -> None:
    """Write DATASET pre-tokenized for TRL's SFTTrainer: input_ids and labels (-100 where
    `train_detail` says not to train), with a README naming the source, tokenizer and counts."""
    from flows.training.export import ExportError, export_dataset

    try:
        result = export_dataset(dataset, tokenizer, to, max_length=max_length)
    except (ExportError, OSError) as exc:
        _fail(str(exc))
    typer.echo(
        f"{result.rows} rows to {result.path} ({result.too_long} longer than --max-length and "
        f"{result.untrained} with nothing trained dropped; longest {result.longest} tokens)"
    )


@app.command()
def check(recipe: Path = typer.Argument(..., help="recipe YAML")) -> None:
    """Validate a recipe and its problem source without calling any model; with `decontaminate:`,
    count the problems each benchmark sets aside."""
    from flows.inputs.decontamination import counts_by_benchmark, find_contamination
    from flows.inputs.problem_shards import load_problems
    from flows.inputs.problems import ProblemSourceError
    from schemas.recipe import RecipeError, check_job, job_of, load_recipe

    try:
        loaded = load_recipe(recipe)
        job = job_of(loaded)
        check_job(loaded, job, str(recipe))
        problems = load_problems(loaded.problems) if loaded.problems else []
        found = find_contamination(problems, loaded.decontaminate) if loaded.decontaminate else []
    except (RecipeError, ProblemSourceError) as exc:
        _fail(str(exc))
    counts = {"prompts": loaded.leakage.n_prompts} if job == "leakage" else {"problems": len(problems) - len(found)}
    if loaded.decontaminate:  # `problems`: those the run answers
        counts["contaminated"] = counts_by_benchmark(loaded.decontaminate, found)
    typer.echo(json.dumps({"run_name": loaded.run_name, "job": job, **counts, "output_dir": str(loaded.output_dir)}))


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """What the recipe will ask of each role — answers, requests, prompt and completion tokens
    — how long that takes and what it costs (online and batch prices), before running it.
    Calls no model unless the recipe asks for a pilot (`plan: {pilot: N}`), whose answers the
    run then reuses from the journal."""
    from flows.inputs.problems import ProblemSourceError
    from flows.models.client import ModelRequestError
    from flows.orchestration.plan import make_plan
    from schemas.recipe import RecipeError, check_job, job_of, load_recipe

    try:
        loaded = load_recipe(recipe)
        job = job_of(loaded)
        check_job(loaded, job, str(recipe))
        made = make_plan(loaded, job)
    except (RecipeError, ProblemSourceError, ModelRequestError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(made.to_dict()))
        return
    print_plan(made)


@app.command()
def publish(recipe: Path = typer.Argument(..., help="recipe YAML of a finished run, with `publish.push_to_hub`")) -> None:
    """Push a finished run's datasets to the Hugging Face Hub again, alone, from the folders on
    disk: nothing is rerun. The token comes from the variable named by `push_to_hub.token_env`."""
    from dataclasses import asdict

    from flows.publishing.hub import HubPushError, push_run
    from schemas.recipe import RecipeError, check_job, job_of, load_recipe

    try:
        loaded = load_recipe(recipe)
        job = job_of(loaded)
        check_job(loaded, job, str(recipe))
        pushed = push_run(loaded, job)
    except (RecipeError, HubPushError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(asdict(pushed)))


@app.command()
def status(
    output: str = typer.Argument(..., help="a run's output_dir (a folder or a URL such as s3://…), or its recipe"),
    as_json: bool = typer.Option(False, "--json", help="print the figures as JSON"),
) -> None:
    """Progress of a run, running or finished, started here or by a worker elsewhere: done /
    total per stage, requests, tokens, rate and ETA, and the request journal's own counts."""
    import tempfile

    from flows.orchestration.terminal import print_status, status_report
    from flows.publishing.storage import OutputLocationError, fetch_state
    from schemas.recipe import RecipeError, is_url, load_recipe

    location = output
    if output.endswith((".yaml", ".yml")) and Path(output).is_file():
        try:
            location = load_recipe(output).output_dir
        except RecipeError as exc:
            _fail(str(exc))
    with tempfile.TemporaryDirectory() as copy:
        state_dir = Path(location) / ".distillery"
        try:
            if is_url(location):
                state_dir = Path(copy)
                fetch_state(location, state_dir)
            elif not Path(location).is_dir():
                _fail(f"{location}: no such folder (give a run's output_dir or its recipe)")
            report = status_report(state_dir)
        except (OSError, ValueError, OutputLocationError) as exc:
            _fail(str(exc))
    if report["progress"] is None and not report["journal"]:
        _fail(f"{location}: no run here (no .distillery/progress.json, no journal)")
    if as_json:
        typer.echo(json.dumps(report))
    else:
        print_status(report, location, results_console())


@app.command()
def serve(
    recipe: Path = typer.Argument(..., help="recipe YAML the deployment runs"),
    cron: str | None = typer.Option(None, help="cron schedule, e.g. '0 3 * * *'"),
    interval: int | None = typer.Option(None, help="run every N seconds"),
) -> None:
    """Serve a deployment `dualdistill/<run_name>` (needs PREFECT_API_URL); trigger it with
    `prefect deployment run dualdistill/<run_name>` or let the schedule do it."""
    from schemas.recipe import RecipeError, load_recipe

    try:
        loaded = load_recipe(recipe, job="dualdistill")
    except RecipeError as exc:
        _fail(str(exc))
    from prefect import serve as prefect_serve

    from flows.dualdistill import dualdistill

    deployment = dualdistill.to_deployment(
        name=loaded.run_name, parameters={"recipe_path": str(recipe.resolve())}, cron=cron, interval=interval
    )
    prefect_serve(deployment)


@app.command()
def deploy(
    recipe: Path = typer.Argument(..., help="recipe YAML; its content becomes the deployment's `recipe` parameter"),
    pool: str = typer.Option("distillery", help="work pool whose workers run it (create it with "
                             "`prefect work-pool create --type process NAME`)"),
    cron: str | None = typer.Option(None, help="cron schedule, e.g. '0 3 * * *'"),
    name: str | None = typer.Option(None, help="deployment name (default: the recipe's run_name)"),
) -> None:
    """Register a deployment of the recipe's flow on the Prefect server (PREFECT_API_URL),
    with the recipe's content as a validated parameter: a worker needs the code, not the file.
    Start a worker with `prefect worker start --pool NAME`."""
    import yaml

    from flows.orchestration.deployments import DeployError, register_deployment
    from schemas.recipe import RecipeError, check_job, job_of, load_recipe

    try:
        loaded = load_recipe(recipe)
        job = job_of(loaded)
        check_job(loaded, job, str(recipe))
        content = yaml.safe_load(recipe.read_text())
        deployment = register_deployment(job, content, name or loaded.run_name, pool=pool, cron=cron)
    except (RecipeError, DeployError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(deployment))


if __name__ == "__main__":
    app()
