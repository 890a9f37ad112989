"""What every flow run shares: its name in the Prefect UI, how its stage tasks keep their
results, what it forgets of finished tasks, how it ends on a failure its tasks reported, and
the push to the Hub."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.serializers import PickleSerializer
from prefect.states import Failed

from schemas.recipe import Recipe


# How shard tasks keep their results: persisted, so that a rerun's cache hits read them back,
# and, on the flow's event loop, not also in Prefect's in-memory result cache, which holds up
# to 1,000 results (here every shard's answers, for the whole run). Pickled by the standard
# library, not Prefect's default cloudpickle: the results are module-level classes, and
# Prefect pickles them on the event loop while requests wait (a shard's 500 graded answers:
# 7 ms instead of 10). A shard task on a Dask or Ray worker keeps its value in memory
# (`cache_result_in_memory`): it travels back to the flow that way.
PERSISTED = {"persist_result": True, "cache_result_in_memory": False,
             "result_serializer": PickleSerializer(picklelib="pickle")}


def flow_run_name() -> str:
    """The recipe's file, or the run_name of a recipe passed as content (a deployment)."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters or {}
    recipe = parameters.get("recipe") or {}
    return str(parameters.get("recipe_path") or recipe.get("run_name") or "recipe")


def attempt() -> str:
    """"attempt N" of this flow run (a retry from the UI is a new attempt of the same run)."""
    context = FlowRunContext.get()
    return f"attempt {context.flow_run.run_count}" if context and context.flow_run else "this attempt"


class RunFailed(RuntimeError):
    """Shards of the run failed; everything answered so far is journaled. Each failed shard's
    task logged its own error and traceback."""


def failed_run(error: BaseException) -> State:
    """How a flow ends on a failure that its tasks already reported (`RunFailed`, a budget cap,
    prompts that got no completion): a Failed state whose message is the error on one line
    (Prefect shows a state's message, escaped, in its log lines and UI), without Prefect's
    second traceback of the same failure. Calling the flow still raises `error` itself."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return Failed(message=f"{type(error).__name__}: {text}", data=error)


def forget_links(*results: object) -> None:
    """Drop what Prefect remembers of these finished task results for the rest of the flow run.

    For dependency tracking, Prefect maps the `id()` of every task result, and of each member
    of a returned list, tuple or dict, to its task run's state (`FlowRunContext.run_results`),
    for as long as the flow runs: ~2 entries a problem, for every shard of the run. Our flows
    pass results on `quote`d, so those entries are never looked up."""
    context = FlowRunContext.get()
    if context is None:
        return
    for result in results:
        members = result.values() if isinstance(result, dict) else result if isinstance(result, (list, tuple)) else ()
        for item in (result, *members):
            context.run_results.pop(id(item), None)


@task(name="push-to-hub")
def push_to_hub_task(recipe: Recipe, job: str) -> dict:
    """After everything is on disk: a failed push fails the run with a message that says how
    to push again alone (`distillery publish RECIPE.yaml`); nothing is lost."""
    from flows.publishing.hub import push_run  # imports `datasets` (~0.9 s): only when a run pushes

    return asdict(push_run(recipe, job))
