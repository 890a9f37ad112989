"""Deployments of the three flows on a Prefect server, for the workers of a work pool.

A deployment runs a job's flow with the recipe's *content* as its `recipe` parameter (a
mapping the flow validates like a file), so a worker needs the code, not the recipe file.
The code comes from this checkout (`Flow.from_source` on the repository folder): a worker
on another machine needs the same checkout at the same path, or a `prefect.yaml` pull step
(see recipes/prefect.yaml). Every check that can fail before anything is registered is made first,
with an error that names what to fix: no server configured, a server that does not answer,
an unknown work pool, a bad cron string.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINTS = {  # job -> the flow's entrypoint, relative to ROOT
    "dualdistill": "flows/dualdistill.py:dualdistill",
    "self_distill": "flows/self_distill.py:self_distill",
    "leakage": "flows/leakage.py:leakage",
}


class DeployError(RuntimeError):
    """The deployment cannot be registered; the message says what to fix."""


def check_cron(cron: str | None) -> None:
    if cron is None:
        return
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError as exc:
        reason = str(exc).splitlines()[-1].strip()
        raise DeployError(f"--cron {cron!r} is not a valid cron string ({reason}); e.g. '0 3 * * *'") from None


def check_server_and_pool(pool: str) -> str:
    """The API URL, once the server answers and has `pool`."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError("no Prefect server configured: start one (`prefect server start`) and set "
                          "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
        if failure is not None:
            raise DeployError(f"the Prefect server at {url} does not answer: {type(failure).__name__}: {failure}")
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise DeployError(f"work pool {pool!r} does not exist on {url}; create it with "
                              f"`prefect work-pool create --type process {pool}`") from None
    return url


def register_deployment(job: str, recipe: dict[str, Any], name: str, *, pool: str, cron: str | None) -> dict[str, str]:
    """Register `job`'s flow with `recipe` as its parameter; returns what was registered."""
    from prefect import Flow

    check_cron(cron)
    url = check_server_and_pool(pool)
    flow = Flow.from_source(source=str(ROOT), entrypoint=ENTRYPOINTS[job])
    with contextlib.redirect_stdout(sys.stderr):  # Prefect prints its own table; stdout stays ours
        deployment_id = flow.deploy(
            name=name, work_pool_name=pool, parameters={"recipe": recipe}, cron=cron, build=False, push=False,
            print_next_steps=False, ignore_warnings=True, tags=["distillery", job],
        )
    return {"deployment": f"{flow.name}/{name}", "id": str(deployment_id), "pool": pool, "cron": cron or "",
            "server": url, "run": f"prefect deployment run '{flow.name}/{name}'"}
