"""Progress of a run, per stage: done / total, requests, tokens, rate, ETA.

One `RunProgress` per flow run. Stage logic calls the ticker it is given once per finished
unit (an answer, a sample, a completion); the flow calls `shard_done` when a shard's task
returns, cached shards included. Figures go to two places:

- `state_dir/progress.json`, rewritten at most once a second: `distillery run` draws its
  progress bars from it, and `distillery status OUTPUT_DIR` reads it for a run started
  elsewhere (with the journal's own counts beside it);
- one Prefect progress artifact per stage, updated as shards finish, whose description
  carries the figures (the UI shows it on the flow run's Artifacts tab).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from flows.models.budget import BudgetReached
from flows.models.client import ClientStats

PROGRESS_FILE = "progress.json"
WRITE_EVERY_S = 1.0
ARTIFACT_EVERY_S = 2.0


@dataclass
class Stage:
    name: str
    unit: str
    total: int
    stats: ClientStats | None = None  # the stage's model client, for requests and tokens
    done_by_shard: dict[str, int] = field(default_factory=dict)
    worked: int = 0  # units finished by this process (not from cached stage results): the rate
    started: float = field(default_factory=time.time)
    artifact_id: UUID | None = None
    artifact_at: float = 0.0

    @property
    def done(self) -> int:
        return sum(self.done_by_shard.values())

    def figures(self, now: float) -> dict[str, Any]:
        elapsed = max(now - self.started, 1e-9)
        rate = self.worked / elapsed
        remaining = max(self.total - self.done, 0)
        figures: dict[str, Any] = {
            "name": self.name, "unit": self.unit, "done": self.done, "total": self.total,
            "elapsed_s": round(elapsed, 1), "per_s": round(rate, 2),
            "eta_s": 0.0 if remaining == 0 else (round(remaining / rate, 1) if self.worked else None),
        }
        if self.stats is not None:
            figures |= {"requests": self.stats.sent, "replayed": self.stats.replayed,
                        "requests_per_s": round(self.stats.sent / elapsed, 2),
                        "prompt_tokens": self.stats.prompt_tokens, "completion_tokens": self.stats.completion_tokens}
        return figures


def describe(figures: dict[str, Any]) -> str:
    """One line per stage, as the artifact and `distillery status` show it."""
    parts = [f"{figures['done']}/{figures['total']} {figures['unit']}"]
    if "requests" in figures:
        parts.append(f"{figures['requests']} requests sent ({figures['replayed']} from the journal), "
                     f"{figures['requests_per_s']:.1f} req/s")
        parts.append(f"{figures['prompt_tokens']:,} / {figures['completion_tokens']:,} tokens in / out")
    else:
        parts.append(f"{figures['per_s']:.1f} {figures['unit']}/s")
    parts.append("done" if figures["done"] >= figures["total"] else f"ETA {format_eta(figures['eta_s'])}")
    return " · ".join(parts)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RunProgress:
    def __init__(self, state_dir: Path, run_name: str, job: str) -> None:
        self.path = state_dir / PROGRESS_FILE
        self.run_name, self.job = run_name, job
        self.started = time.time()
        self.stages: dict[str, Stage] = {}
        self.state = "running"
        self._written = 0.0
        # every call comes from the flow's event loop: no lock

    def stage(self, name: str, total: int, unit: str, stats: ClientStats | None = None) -> None:
        self.stages[name] = Stage(name, unit, total, stats)
        self.write(force=True)

    def ticker(self, stage: str, shard: str) -> Callable[[], None]:
        """A callable for one finished unit of `shard`; counting restarts at 0, so a retried
        shard does not count its units twice."""
        current = self.stages[stage]
        current.done_by_shard[shard] = 0

        def tick() -> None:
            current.done_by_shard[shard] += 1
            current.worked += 1
            self.write()

        return tick

    def shard_done(self, stage: str, shard: str, units: int, worked: bool = False) -> None:
        """`units` of `shard` are done. `worked`: for a stage with no ticker (grading), they were
        done now, so they count in the stage's rate and ETA."""
        current = self.stages[stage]
        if worked:
            current.worked += units - current.done_by_shard.get(shard, 0)
        current.done_by_shard[shard] = units
        self.write()

    def finish(self, state: str) -> None:
        self.state = state
        self.write(force=True)

    def failed(self, error: BaseException) -> None:
        """The run ends on `error`: stopped by its budget (a cap of `budget:`), or failed."""
        self.finish("stopped by its budget" if isinstance(error, BudgetReached) else "failed")

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        stages = [stage.figures(now) for stage in self.stages.values()]
        return {
            "run_name": self.run_name, "job": self.job, "state": self.state, "pid": os.getpid(),
            "host": socket.gethostname(), "started": round(self.started, 3), "updated": round(now, 3),
            "stages": stages,
        }

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written < WRITE_EVERY_S:
            return
        self._written = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".tmp-{os.getpid()}")
        temporary.write_text(json.dumps(self.snapshot(), indent=1))
        os.replace(temporary, self.path)  # a reader never sees half a file

    async def publish(self, force: bool = False) -> None:
        """Create or update each stage's Prefect progress artifact (at most every 2 s a stage).
        A stage has one artifact per flow run: a retried run (a new attempt of the same flow run)
        updates the artifacts its failed attempt left instead of adding new ones beside them.
        Once the run has ended (`finish`), the description says how instead of an ETA."""
        from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

        now = time.time()
        for stage in self.stages.values():
            if not force and now - stage.artifact_at < ARTIFACT_EVERY_S:
                continue
            stage.artifact_at = now
            figures = stage.figures(now)
            percent = 100.0 * figures["done"] / figures["total"] if figures["total"] else 100.0
            description = f"{self.run_name} — {stage.name}: {describe(figures)}"
            if self.state != "running" and figures["done"] < figures["total"]:
                description = f"{description.rsplit(' · ', 1)[0]} · run {self.state}"
            if stage.artifact_id is None:
                key = re.sub(r"[^a-z0-9-]+", "-", f"{self.job}-{self.run_name}-{stage.name}".lower()).strip("-")
                stage.artifact_id = await _earlier_attempts_artifact(key)
                if stage.artifact_id is None:
                    stage.artifact_id = await acreate_progress_artifact(percent, key=key, description=description)
                    continue
            await aupdate_progress_artifact(stage.artifact_id, percent, description=description)


async def _earlier_attempts_artifact(key: str) -> UUID | None:
    """The progress artifact `key` that an earlier attempt of this flow run made, if any."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    match = ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[context.flow_run.id]))
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=match, limit=1)
    return found[0].id if found else None


def read_progress(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / PROGRESS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a progress file ({exc})") from None


def is_stale(progress: dict[str, Any], now: float | None = None) -> bool:
    """A run that says `running` but whose process is gone (checked on this host) or that
    has not written for five minutes."""
    if progress.get("state") != "running":
        return False
    if progress.get("host") == socket.gethostname():
        try:
            os.kill(int(progress["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            pass
    return (now or time.time()) - float(progress.get("updated", 0)) > 300


def journal_figures(journal_dir: Path) -> list[dict[str, Any]]:
    """Per journal file (one per role and shard, e.g. `tool-shard-00003`): entries, model
    answers, tokens and the time of the last entry."""
    rows = []
    for path in sorted(journal_dir.glob("*.jsonl")):
        row = {"file": path.stem, "entries": 0, "answers": 0, "prompt_tokens": 0, "completion_tokens": 0,
               "last": None}
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                row["entries"] += 1
                value = entry.get("value") or {}
                if "finish_reason" in value:
                    row["answers"] += 1
                    row["prompt_tokens"] += value.get("prompt_tokens") or 0
                    row["completion_tokens"] += value.get("completion_tokens") or 0
                row["last"] = entry.get("time", row["last"])
        rows.append(row)
    return rows


def journal_by_role(journal_dir: Path) -> dict[str, dict[str, Any]]:
    """`journal_figures` summed over the shards of each role (the file name up to `-shard`,
    or up to the last `-` for other names)."""
    totals: dict[str, dict[str, Any]] = {}
    for row in journal_figures(journal_dir):
        match = re.match(r"(.+?)-(?:r\d+-)?shard-\d+$", row["file"]) or re.match(r"(.+)-[^-]+$", row["file"])
        role = match.group(1) if match else row["file"]
        total = totals.setdefault(role, {"files": 0, "entries": 0, "answers": 0, "prompt_tokens": 0,
                                         "completion_tokens": 0, "last": None})
        total["files"] += 1
        for key in ("entries", "answers", "prompt_tokens", "completion_tokens"):
            total[key] += row[key]
        if row["last"] is not None:
            total["last"] = max(total["last"] or 0, row["last"])
    return totals
