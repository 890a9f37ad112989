"""What a terminal shows of a run: live progress bars while it runs, and `distillery status`.

Both read `progress.json` (written by the flow's `RunProgress`), so a run started by a
worker elsewhere shows the same figures as one started here.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from flows.orchestration.progress import format_eta, is_stale, journal_by_role, read_progress

POLL_S = 0.5


def quiet_prefect_console() -> None:
    """Show only warnings and errors of Prefect's own console logging (task and flow run
    lines); the API handler still sends every log line to the server and its UI."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):  # "": the root, where Prefect puts it
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.WARNING)
    # the processes this one starts (a local Dask or Ray cluster's workers) print to the same
    # terminal: their Prefect console lines too, and Dask's own chatter, only from warnings up
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)


def quiet_third_party() -> None:
    """No progress bars or chatter of the libraries a run uses between our own progress bars:
    `datasets`' "Generating train split", `huggingface_hub`'s and transformers' bars and info
    lines ("Loading weights"), the GGUF conversion's bars, and `FutureWarning`s. Errors and our
    own warnings still print; `--logs` keeps everything. Called before those libraries are
    imported: they read these settings as they load."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF conversion's and any other tqdm bar
    # read when `datasets` is first imported; not imported here (~1 s before the first request)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("datasets", "transformers", "huggingface_hub", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "datasets" in sys.modules:  # imported already: the variables above came too late
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _rate(stage: dict[str, Any]) -> str:
    if "requests_per_s" in stage:
        return f"{stage['requests_per_s']:.1f} req/s"
    return f"{stage['per_s']:.1f} {stage['unit']}/s"


def _eta(stage: dict[str, Any]) -> str:
    return "done" if stage["done"] >= stage["total"] else f"ETA {format_eta(stage['eta_s'])}"


class ProgressBars:
    """A bar per stage (done / total, rate, ETA), redrawn from `progress.json` twice a second
    by a background thread while the flow runs in this process."""

    def __init__(self, state_dir: Path, console: Console) -> None:
        self.state_dir = state_dir
        self.started = time.time()
        self.bars = Progress(
            TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]:<11} {task.fields[rate]:>14}  {task.fields[eta]}"),
            console=console, refresh_per_second=4,
        )
        self.tasks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="progress-bars", daemon=True)

    def __enter__(self) -> ProgressBars:
        self.bars.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
        self.bars.stop()

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._update()

    def _update(self) -> None:
        try:
            progress = read_progress(self.state_dir)
        except (OSError, ValueError):
            return
        if progress is None or progress.get("updated", 0) < self.started - 1:
            return  # nothing yet, or an earlier run's file
        for stage in progress["stages"]:
            fields = {"unit": stage["unit"], "rate": _rate(stage), "eta": _eta(stage)}
            if stage["name"] not in self.tasks:
                self.tasks[stage["name"]] = self.bars.add_task(escape(stage["name"]), total=stage["total"], **fields)
            self.bars.update(self.tasks[stage["name"]], completed=stage["done"], total=stage["total"], **fields)


def _ago(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "never"
    when = datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    return f"{when} ({format_eta(now - timestamp)} ago)"


def status_report(state_dir: Path) -> dict[str, Any]:
    """What `distillery status` shows, as data: the run's progress file and the journal's
    own counts per role."""
    progress = read_progress(state_dir)
    if progress is not None:
        progress = {**progress, "stale": is_stale(progress)}
    return {"progress": progress, "journal": journal_by_role(state_dir / "journal")}


def print_status(report: dict[str, Any], output_dir: str, console: Console) -> None:
    now = time.time()
    progress = report["progress"]
    if progress is None:
        console.print(f"{output_dir}: no progress file (a run of an older version, or none yet)")
    else:
        state = progress["state"]
        if progress["stale"]:
            state = "stopped (its process is gone or silent for 5 min): rerun the recipe to resume"
        console.print(f"[bold]{progress['run_name']}[/] ({progress['job']}): {state}")
        console.print(f"started {_ago(progress['started'], now)}; last update {_ago(progress['updated'], now)} "
                      f"by pid {progress['pid']} on {progress['host']}")
        table = Table("stage", "done / total", "", "requests (journal)", "tokens in / out", "rate", "ETA")
        for s in progress["stages"]:
            share = s["done"] / s["total"] if s["total"] else 1.0
            requests = f"{s['requests']} ({s['replayed']})" if "requests" in s else ""
            tokens = f"{s['prompt_tokens']:,} / {s['completion_tokens']:,}" if "requests" in s else ""
            table.add_row(escape(s["name"]), f"{s['done']}/{s['total']} {s['unit']}", f"{share:.0%}", requests, tokens,
                          _rate(s), _eta(s))
        console.print(table)
    journal = report["journal"]
    if journal:
        table = Table("journal", "files", "model answers", "tokens in / out", "last entry", title="request journal")
        for role, j in journal.items():
            table.add_row(role, str(j["files"]), str(j["answers"]),
                          f"{j['prompt_tokens']:,} / {j['completion_tokens']:,}", _ago(j["last"], now))
        console.print(table)
    else:
        console.print("request journal: empty")
