"""A fault drill for the DualDistill flow, shared by tests/test_faults.py and
bench/bench_faults.py.

Teachers on one loopback fake server answer 429 with `Retry-After`, 500, nothing (the
client times out) or slowly, at random with a seed (`SeededFaults`). A `distillery run`
process is killed with SIGKILL at a random moment and rerun until it completes; its
datasets are compared with an undisturbed run's, row for row, order aside.

What the server answered (a 200 written) before the kill is split, with the killed run's
journal, into answers the journal holds (`resent_journaled` counts those a later run sent
again: must be 0) and the window (`window`): answers the server wrote that never reached
the journal because the process died first (in its socket buffer, or read but not yet
appended). Only those may legitimately be sent again.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fake_openai import FakeOpenAIServer, Reply, problem_text, teacher_role
from flow_helpers import ScriptedTeachers, write_problems, write_recipe

# answers that vary between runs of the same requests, whatever happened
VOLATILE = {"latency_s", "replayed_requests"}
# a dataset's rows are told apart by these columns (no row may appear twice)
ROW_KEYS = {"composites": ("id",), "trajectories": ("problem_id", "teacher", "sample"), "rejected": ("id",)}
TIMEOUT_S = 2.0  # the teachers' request timeout in the drill


def request_key(body: dict[str, Any]) -> str:
    """The journal key the client computed for a request body it sent (sample 0)."""
    from flows.models.journal import request_key as key_of

    params = {k: v for k, v in body.items() if k not in {"model", "messages", "n", "tools", "max_tokens"}}
    return key_of("chat", {"model": body["model"], "messages": body["messages"], "params": params,
                           "extra": {}, "tools": body.get("tools"), "sample": 0})


class FewCodeTeachers(ScriptedTeachers):
    """`ScriptedTeachers`, but the tool teacher writes code for one problem in `code_every`
    only (answering directly otherwise): a thousand sandbox runs would dominate the drill."""

    def __init__(self, rows: list[dict], code_every: int = 10) -> None:
        super().__init__(rows)
        self.code_every = code_every
        self.texts = set(self.by_text)

    def __call__(self, body: dict) -> Reply:
        text = problem_text(body, self.texts)
        row = self.by_text[text]
        kind, number = row["id"].rsplit("-", 1)
        if teacher_role(body) == "tool" and int(number) % self.code_every:
            a, b = (int(x) for x in text.split("What is ")[1].rstrip("?").split(" + "))
            value = a + b if kind in ("both_correct", "tool_only") else a - b
            return Reply(content=f"Adding up.\n<answer>\\boxed{{{value}}}</answer>")
        return super().__call__(body)


@dataclass
class SeededFaults:
    """Wraps a responder: each attempt at a request meets a fault drawn from (seed, request,
    attempt). Logs every request received, with its time."""

    answer: Any
    seed: int
    share_429: float = 0.04
    share_500: float = 0.04
    share_timeout: float = 0.02
    share_slow: float = 0.10
    received: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, request key)
    faults: Counter = field(default_factory=Counter)
    _attempts: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, body: dict) -> Reply:
        key = request_key(body)
        with self._lock:
            attempt = self._attempts[key]
            self._attempts[key] += 1
            self.received.append((time.monotonic(), key))
        draw = random.Random(f"{self.seed}:{key}:{attempt}")
        roll, fault = draw.random(), None
        for name, share in (("429", self.share_429), ("500", self.share_500), ("timeout", self.share_timeout),
                            ("slow", self.share_slow)):
            if roll < share:
                fault = name
                break
            roll -= share
        with self._lock:
            self.faults[fault or "none"] += 1
        if fault == "429":
            return Reply(status=429, headers={"Retry-After": "1"}, delay_s=0.0)
        if fault == "500":
            return Reply(status=500, delay_s=0.0)
        if fault == "timeout":
            return Reply(drop=True, delay_s=TIMEOUT_S + 0.5)
        reply = self.answer(body)
        reply.delay_s = draw.uniform(0.2, 0.8) if fault == "slow" else None
        return reply


@dataclass
class Drill:
    problems: int
    seed: int
    undisturbed_s: float = 0.0
    disturbed_s: float = 0.0  # every run of the disturbed output, killed one included
    killed_after_answers: int = 0
    killed: bool = False
    reruns: int = 0
    rerun_codes: list[int] = field(default_factory=list)
    answered_before_kill: int = 0
    journaled_at_kill: int = 0
    window: int = 0  # answered before the kill, not in the journal
    window_age_ms: list[int] = field(default_factory=list)  # min, median, max: how long before the kill
    written_after_kill: int = 0  # answers to the killed run's requests written after it died
    resent_journaled: int = 0  # must be 0
    resent_window: int = 0
    sent_after_kill: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    differences: dict[str, int] = field(default_factory=dict)  # per dataset: rows not in both
    duplicates: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def report(self) -> str:
        return json.dumps(self.__dict__, indent=1)


def teacher_options(recipe: Path, **options: Any) -> None:
    data = yaml.safe_load(recipe.read_text())
    for role in ("tool", "reasoning"):
        data["teachers"][role].update(options)
    recipe.write_text(yaml.safe_dump(data))


def start_run(recipe: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(recipe), "--logs"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def drill(tmp: Path, problems: int, seed: int, env: dict[str, str], shard_size: int = 100,
          concurrency: int = 16, max_reruns: int = 4) -> Drill:
    """The undisturbed run, then the faulted one killed and rerun; returns the figures."""
    result = Drill(problems, seed)
    rows = write_problems(tmp / "problems.jsonl", per_kind=problems // 4)
    script = FewCodeTeachers(rows)
    options = {"max_concurrency": concurrency, "max_retries": 8, "timeout_s": TIMEOUT_S}

    with FakeOpenAIServer(script) as clean:
        recipe = write_recipe(tmp / "clean.yaml", tmp / "problems.jsonl", clean.base_url, tmp / "clean",
                              shard_size=shard_size)
        teacher_options(recipe, **options)
        started = time.monotonic()
        code = start_run(recipe, tmp / "clean.log", env).wait()
        result.undisturbed_s = round(time.monotonic() - started, 1)
        assert code == 0, (tmp / "clean.log").read_text()[-3000:]
        expected = len(clean.requests)

    faults = SeededFaults(script, seed)
    rng = random.Random(seed)
    with FakeOpenAIServer(faults) as server:
        recipe = write_recipe(tmp / "faulty.yaml", tmp / "problems.jsonl", server.base_url, tmp / "faulty",
                              shard_size=shard_size)
        teacher_options(recipe, **options)
        started = time.monotonic()
        child = start_run(recipe, tmp / "faulty.log", env)
        result.killed_after_answers = target = rng.randint(1, expected)
        while len(server.answered) < target and child.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.2))
        killed_at = time.monotonic()
        child.kill()
        child.wait()
        result.killed = child.returncode == -9
        journaled = journal_keys(tmp / "faulty" / ".distillery" / "journal")
        for _ in range(max_reruns):
            result.reruns += 1
            code = start_run(recipe, tmp / "faulty.log", env).wait()
            result.rerun_codes.append(code)
            if code == 0:
                break
        result.disturbed_s = round(time.monotonic() - started, 1)
        written_at = {request_key(body): written for _, written, body in server.answered if written <= killed_at}
        answered = set(written_at)
        late = {request_key(body) for received, written, body in server.answered
                if received <= killed_at < written}
        sent_after = {key for at, key in faults.received if at > killed_at}
    result.faults = dict(faults.faults)
    result.answered_before_kill, result.journaled_at_kill = len(answered), len(journaled)
    window = answered - journaled
    result.window, result.written_after_kill = len(window), len(late - answered)
    ages = sorted(round(1000 * (killed_at - written_at[key])) for key in window)
    result.window_age_ms = [ages[0], ages[len(ages) // 2], ages[-1]] if ages else []
    result.resent_journaled = len(answered & journaled & sent_after)
    result.resent_window = len(window & sent_after)
    result.sent_after_kill = len(sent_after)
    for name in ROW_KEYS:
        clean_rows, faulty_rows = dataset_rows(tmp / "clean" / name), dataset_rows(tmp / "faulty" / name)
        result.rows[name] = len(faulty_rows)
        result.differences[name] = sum(((clean_rows - faulty_rows) + (faulty_rows - clean_rows)).values())
        keys = Counter(tuple(json.loads(row)[k] for k in ROW_KEYS[name]) for row in faulty_rows.elements())
        result.duplicates[name] = sum(n - 1 for n in keys.values() if n > 1)
    return result


def journal_keys(folder: Path) -> set[str]:
    """Chat requests the journal holds (a torn last line, cut by the kill, is not an answer)."""
    keys = set()
    for path in folder.glob("*.jsonl"):
        for line in path.read_bytes().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "finish_reason" in entry.get("value", {}):
                keys.add(entry["key"])
    return keys


def dataset_rows(folder: Path) -> Counter:
    """A published dataset's rows as canonical JSON, run-dependent columns left out."""
    import pyarrow.parquet as pq

    rows: Counter = Counter()
    for path in sorted((folder / "data").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[json.dumps({k: v for k, v in row.items() if k not in VOLATILE}, sort_keys=True, default=str)] += 1
    return rows


def drill_env() -> dict[str, str]:
    """The environment of the drill's `distillery run` processes: the running Prefect API."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
