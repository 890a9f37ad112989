"""What every flow run shares: its name in the Prefect UI."""

from __future__ import annotations


def flow_run_name() -> str:
    """The recipe's file, or the run_name of a recipe passed as content (a deployment)."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters or {}
    recipe = parameters.get("recipe") or {}
    return str(parameters.get("recipe_path") or recipe.get("run_name") or "recipe")
