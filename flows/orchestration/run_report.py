"""A finished run's `report.html`: written under `output_dir` and linked as a Prefect artifact.

Each flow calls `publish_report(recipe, job)` once, after its datasets and summary are written
and before its outputs are pushed to an object store (so the page travels with them). The page
itself is `flows.publishing.html_report` (no Prefect there).
"""

from __future__ import annotations

import asyncio
import re

from prefect.artifacts import create_link_artifact

from flows.publishing.storage import output_location
from schemas.recipe import Recipe


async def publish_report(recipe: Recipe, job: str) -> str:
    """Write the run's report.html and link it from the flow run; returns where the user finds it
    (a path, or a URL for an object-store output_dir)."""
    # here, not at the top: the page builder is only needed at a run's end, so a run's start does not import it
    from flows.publishing.html_report import REPORT_NAME, write_html_report

    path = await asyncio.to_thread(write_html_report, recipe.work_dir, job, recipe.run_name)
    location = output_location(recipe, path)
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{job}-report-{recipe.run_name}".lower())
    await create_link_artifact(
        key=slug, link=location if recipe.remote_output else path.resolve().as_uri(), link_text=REPORT_NAME,
        description="The run's report: one self-contained page that opens offline in a browser",
    )
    return location
