"""What every flow run shares: its name in the Prefect UI, and the push to the Hub."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from schemas.recipe import Recipe


def flow_run_name() -> str:
    """The recipe's file, or the run_name of a recipe passed as content (a deployment)."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters or {}
    recipe = parameters.get("recipe") or {}
    return str(parameters.get("recipe_path") or recipe.get("run_name") or "recipe")


@task(name="push-to-hub")
def push_to_hub_task(recipe: Recipe, job: str) -> dict:
    """After everything is on disk: a failed push fails the run with a message that says how
    to push again alone (`distillery publish RECIPE.yaml`); nothing is lost."""
    from flows.publishing.hub import push_run  # imports `datasets` (~0.9 s): only when a run pushes

    return asdict(push_run(recipe, job))
