"""Scale-out (`execution:`): shards on a local Dask cluster or a local Ray runtime give the
same datasets as threads, a rerun sends nothing, and a failed shard fails the run by name."""

from __future__ import annotations

import asyncio
import json
import pickle
import threading
from types import SimpleNamespace

import datasets
import pytest
from fake_openai import FakeOpenAIServer, Reply
from moto_s3 import fresh_machines, moto_s3
from flow_helpers import ScriptedTeachers, write_problems, write_recipe

from flows.models.budget import BudgetReached
from flows.models.client import ModelRequestError
from flows.orchestration.task_runners import TaskRunnerUnavailable, build_task_runner, map_on_workers
from flows.orchestration.on_worker import WorkerError, portable
from flows.dualdistill import dualdistill_shard as run_shard
from flows.stages.shards import ShardFailed
from schemas.recipe import ExecutionSpec, load_recipe

PER_KIND = 3  # 12 problems in 4 shards of 3
CASES = {"both_correct": 3, "first_correct": 3, "second_corrects": 3, "both_wrong": 3}


def run(recipe_path):
    from flows.dualdistill import dualdistill

    return asyncio.run(dualdistill(str(recipe_path)))


def rows_of(folder, *order):
    rows = datasets.load_dataset(str(folder), split="train").to_list()
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in order))


def comparable(rows):
    """Dataset rows without what differs between two runs of the same answers (timings)."""
    return [{k: v for k, v in r.items() if k not in {"latency_s"}} for r in rows]


def needs(module: str) -> None:
    pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test]' installs it)")


# -- no cluster: the pieces ------------------------------------------------------------------


def test_runners_are_built_from_the_recipe():
    needs("prefect_dask")
    needs("prefect_ray")
    local = build_task_runner(ExecutionSpec(task_runner="dask", workers=3))
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["threads_per_worker"] == 1
    assert build_task_runner(ExecutionSpec(task_runner="dask", address="tcp://10.0.0.1:8786")).address == \
        "tcp://10.0.0.1:8786"
    ray = build_task_runner(ExecutionSpec(task_runner="ray", workers=2))
    assert ray.init_kwargs["num_cpus"] == 2 and ray.address is None
    assert build_task_runner(ExecutionSpec(task_runner="ray", address="ray://head:10001")).init_kwargs.get(
        "num_cpus") is None


def test_a_missing_package_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # import prefect_dask now raises ImportError
    with pytest.raises(TaskRunnerUnavailable, match=r"distillery\[dask\]"):
        build_task_runner(ExecutionSpec(task_runner="dask"))


def test_failures_cross_a_process_boundary_with_their_message():
    error = ModelRequestError("http://gpu:8000/v1", "m", "HTTP 500 after 2 retries")  # does not unpickle as it is
    failure = ShardFailed("answer[tool]", "shard-00002", [("p1", error), ("p2", BudgetReached("budget.requests"))], 3)
    travelled = pickle.loads(pickle.dumps(portable(failure)))
    assert isinstance(travelled, ShardFailed) and str(travelled) == str(failure)
    assert travelled.stage == "answer[tool]" and travelled.shard == "shard-00002"
    (_, first), (_, second) = travelled.errors
    assert isinstance(first, WorkerError) and first.type_name == "ModelRequestError" and str(first) == str(error)
    assert isinstance(second, BudgetReached)
    group = pickle.loads(pickle.dumps(portable(BaseExceptionGroup("both", [failure, ValueError("x")]))))
    assert isinstance(group.exceptions[0], ShardFailed) and isinstance(group.exceptions[1], ValueError)


class _Future:
    """A task on a fake two-worker cluster: it ends when the test says so, its callbacks in another thread."""

    def __init__(self, value) -> None:
        from prefect.states import Completed

        self.value, self.state, self.task_run_id, self.callbacks = value, Completed(), "fake", []

    def add_done_callback(self, fn) -> None:
        self.callbacks.append(fn)

    def end(self) -> None:
        threading.Thread(target=lambda: [fn(self) for fn in self.callbacks]).start()

    def result(self, raise_on_failure=True):
        return self.value


def test_shards_go_to_the_cluster_as_it_takes_them_not_all_at_once():
    class Cluster:
        workers = {"worker-1": 1, "worker-2": 1}
        client = SimpleNamespace(nthreads=lambda: Cluster.workers)
        submitted: list[_Future] = []

        def submit(self, task, parameters):
            self.submitted.append(_Future(parameters["n"] * 10))
            return self.submitted[-1]

    cluster, read, seen = Cluster(), [], []

    def calls():
        for n in range(14):
            read.append(n)  # a shard's problems are read when its call is taken
            yield {"n": n}

    async def on_finished(done):
        seen.append((done.index, done.value))

    async def until(condition) -> None:
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    order = [3, 0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # out of order, one at a time

    async def main():
        mapped = asyncio.create_task(map_on_workers(cluster, None, calls(), on_finished))
        for ended, index in enumerate(order):
            await until(lambda: len(cluster.submitted) > index)
            # twice the cluster's workers under way; each call taken (read) only when submitted
            assert len(cluster.submitted) == len(read) == min(14, len(seen) + 2 * len(Cluster.workers))
            if ended == 5:
                Cluster.workers = {**Cluster.workers, "worker-3": 1}  # the cluster scales up
            cluster.submitted[index].end()
            await until(lambda: len(seen) == ended + 1)
        return await mapped

    assert asyncio.run(main()) == [n * 10 for n in range(14)]  # in call order
    assert [index for index, _ in seen] == order  # in the order they ended


def test_a_shard_runs_self_contained_and_replays_from_the_journal(tmp_path):
    """The worker's function alone (no Prefect): its own runtime from the recipe, then closed."""
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=1)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url,
                                          tmp_path / "out"))
        from flows.inputs.problem_shards import load_problems

        problems = load_problems(recipe.problems)
        outcome = asyncio.run(run_shard(recipe, 0, problems))
        sent = len(server.requests)
        again = asyncio.run(run_shard(recipe, 0, problems))
    assert sent == 4 * 2 + 4 and len(server.requests) == sent  # the second call is all journal replays
    assert outcome.stats["tool"].sent == 8 and again.stats["tool"].sent == 0 and again.stats["tool"].replayed == 8
    assert sorted(c.case for c in outcome.composites) == ["both_correct", "first_correct", "second_corrects"]
    assert [r.id for r in outcome.rejected] == ["both_wrong-0"]
    assert [c.model_dump() for c in again.composites] == [c.model_dump() for c in outcome.composites]
    assert sorted(p.name for p in (tmp_path / "out" / ".distillery" / "journal").glob("*.jsonl")) == [
        "reasoning-shard-00000.jsonl", "tool-shard-00000.jsonl"]
    pickle.loads(pickle.dumps(outcome))


# -- a local cluster: the whole flow -----------------------------------------------------------


def _threads_reference(tmp_path, rows):
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "threads.yaml", tmp_path / "problems.jsonl", server.base_url,
                              tmp_path / "threads")
        summary = run(recipe)
    return summary, len(server.requests)


def _same_as_threads_then_rerun_sends_nothing(tmp_path, execution):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=PER_KIND)
    reference, reference_requests = _threads_reference(tmp_path, rows)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              execution=execution)
        summary = run(recipe)
        first_requests = len(server.requests)
    assert summary["cases"] == reference["cases"] == CASES
    assert first_requests == reference_requests == 12 * 3
    assert summary["sent_this_run"] == {"tool": 24, "reasoning": 12} == reference["sent_this_run"]
    assert summary["teachers"] == reference["teachers"]
    for name, order in (("composites", ("id", "first_teacher")), ("rejected", ("id",)),
                        ("trajectories", ("problem_id", "teacher"))):
        ours, theirs = rows_of(tmp_path / "out" / name, *order), rows_of(tmp_path / "threads" / name, *order)
        assert comparable(ours) == comparable(theirs), name
    journal = sorted(p.name for p in (tmp_path / "out" / ".distillery" / "journal").glob("*.jsonl"))
    assert journal == sorted(f"{role}-shard-{i:05d}.jsonl" for role in ("tool", "reasoning") for i in range(4))

    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:  # a rerun: cache hits, no request
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", dead.base_url, tmp_path / "out",
                              execution=execution)
        again = run(recipe)
    assert dead.requests == [] and again["cases"] == CASES
    assert again["sent_this_run"] == {"tool": 0, "reasoning": 0}
    progress = json.loads((tmp_path / "out" / ".distillery" / "progress.json").read_text())
    assert progress["state"] == "completed"
    assert {s["name"]: (s["done"], s["total"]) for s in progress["stages"]} == {
        "answer[tool]": (12, 12), "answer[reasoning]": (12, 12), "grade": (24, 24)}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_dask_local_cluster_gives_the_threads_output_and_a_rerun_sends_nothing(tmp_path):
    needs("prefect_dask")
    _same_as_threads_then_rerun_sends_nothing(tmp_path, {"task_runner": "dask", "workers": 2})


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_ray_local_runtime_gives_the_threads_output_and_a_rerun_sends_nothing(tmp_path):
    needs("prefect_ray")
    _same_as_threads_then_rerun_sends_nothing(tmp_path, {"task_runner": "ray", "workers": 2})


@pytest.fixture(scope="module")
def dask_scheduler():
    """A Dask cluster started outside the flow: recipes reach it by `execution.address`."""
    needs("prefect_dask")
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_failed_shard_on_a_worker_fails_the_run_by_name_and_a_rerun_resends_only_it(tmp_path, dask_scheduler):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=PER_KIND)
    script = ScriptedTeachers(rows)
    broken_problem = rows[4]["problem"]  # in shard 1

    def fails_one_problem(body):
        if any(broken_problem in str(m.get("content")) for m in body["messages"]) and body["model"] == "fake-reasoner":
            return Reply(status=500)
        return script(body)

    execution = {"task_runner": "dask", "address": dask_scheduler}
    with FakeOpenAIServer(fails_one_problem) as broken:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", broken.base_url, tmp_path / "out",
                              execution=execution)
        from flows.orchestration.runs import RunFailed

        with pytest.raises(RunFailed) as failure:
            run(recipe)
        answered = len([r for r in broken.requests if r["model"] == "fake-model"])
    message = str(failure.value)
    assert "1 shard(s) failed" in message and "stage answer[reasoning], shard-00001" in message
    assert broken.base_url in message and "HTTP 500" in message
    assert answered == 24 and not (tmp_path / "out" / "composites").exists()

    with FakeOpenAIServer(script) as healthy:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", healthy.base_url, tmp_path / "out",
                              execution=execution)
        summary = run(recipe)
    assert [r["model"] for r in healthy.requests] == ["fake-reasoner"]  # the one request never answered
    assert summary["cases"] == CASES and summary["sent_this_run"] == {"tool": 0, "reasoning": 1}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_budget_cap_reached_on_a_worker_stops_the_run(tmp_path, dask_scheduler):
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=PER_KIND)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              execution={"task_runner": "dask", "address": dask_scheduler},
                              budget={"requests": 10})
        with pytest.raises(BudgetReached, match=r"budget\.requests"):
            run(recipe)
    progress = json.loads((tmp_path / "out" / ".distillery" / "progress.json").read_text())
    assert progress["state"] == "stopped by its budget"
    # each shard counts the journal as it found it plus its own requests: two shards at once
    # may each send up to the cap's remainder
    assert 10 <= len(server.requests) <= 2 * 10


# -- output_dir as a URL: workers on other machines pull and push the state ----------------------

BUCKET = "scale-out-test"


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as fs:
        yield fs


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """`machine()`: this process now works as a fresh machine would (an empty mirror folder)."""
    return fresh_machines(tmp_path, monkeypatch)


def test_a_shard_on_another_machine_pulls_and_pushes_the_journal_at_the_url(s3, machine, tmp_path):
    from flows.inputs.problem_shards import load_problems

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=1)
    url = f"s3://{BUCKET}/plain"
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, url))
        problems = load_problems(recipe.problems)
        first = asyncio.run(run_shard(recipe, 0, problems, flow_mirror="the-flows-machine:/elsewhere"))
    assert first.stats["tool"].sent == 8
    s3.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in s3.find(f"{BUCKET}/plain/.distillery/journal")) == [
        "reasoning-shard-00000.jsonl", "tool-shard-00000.jsonl"]

    machine()  # the shard again, on a machine that has never seen it: the URL's journal answers
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", dead.base_url, url))
        again = asyncio.run(run_shard(recipe, 0, problems, flow_mirror="the-flows-machine:/elsewhere"))
    assert dead.requests == [] and again.stats["tool"].replayed == 8
    assert [c.model_dump() for c in again.composites] == [c.model_dump() for c in first.composites]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_dask_workers_with_their_own_mirrors_resume_a_url_run_from_its_journal(s3, machine, tmp_path, monkeypatch):
    needs("prefect_dask")
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "workers"))  # the workers' mirrors: not the flow's
    rows = write_problems(tmp_path / "problems.jsonl", per_kind=PER_KIND)
    url = f"s3://{BUCKET}/flow"
    execution = {"task_runner": "dask", "workers": 2}
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        summary = run(write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, url,
                                   execution=execution))
    assert len(server.requests) == 12 * 3 and summary["cases"] == CASES
    assert summary["datasets"]["composites"] == f"{url}/composites"
    assert (tmp_path / "workers" / "outputs").is_dir()  # the workers worked in mirrors of their own

    machine()  # a fresh flow machine, and no cached stage result: every answer from the URL's journal
    s3.rm(f"{BUCKET}/flow/.distillery/prefect-results", recursive=True)
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        again = run(write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", dead.base_url, url,
                                 execution=execution))
    assert dead.requests == [] and again["cases"] == CASES
    assert again["teachers"]["tool"]["replayed_requests"] == 24


# -- the other two jobs on a cluster -----------------------------------------------------------


def with_execution(recipe_path, execution, **fields):
    """The recipe at `recipe_path` with `execution:` (and other top-level fields) set."""
    import yaml

    recipe = yaml.safe_load(recipe_path.read_text())
    recipe.update(execution=execution, **fields)
    recipe_path.write_text(yaml.safe_dump(recipe))
    return recipe_path


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_self_distillation_on_dask_gives_the_threads_output_and_cached_shards_send_nothing(tmp_path, dask_scheduler):
    from test_self_distill import ScriptedStudent, load, write_problems as write_sd_problems
    from test_self_distill import run as run_self_distill, write_recipe as write_sd_recipe

    rows = write_sd_problems(tmp_path / "problems.jsonl")  # 5 problems in shards of 3: 2 shards
    outputs = {}
    for name, execution in (("threads", {"task_runner": "threads"}),
                            ("dask", {"task_runner": "dask", "address": dask_scheduler})):
        with FakeOpenAIServer(ScriptedStudent(rows, wrong_reasoning={"p3"})) as server:
            recipe = with_execution(write_sd_recipe(tmp_path / f"{name}.yaml", tmp_path / "problems.jsonl",
                                                    server.base_url, tmp_path / name), execution)
            outputs[name] = run_self_distill(recipe)
            outputs[name + " requests"] = len(server.requests)
    assert outputs["dask requests"] == outputs["threads requests"] > 20
    ours, theirs = outputs["dask"]["rounds"][0], outputs["threads"]["rounds"][0]
    for figure in ("problems", "samples", "pass_at_k", "mean_score", "examples", "rejected", "sent"):
        assert ours[figure] == theirs[figure], figure
    for folder, order in (("round-1", ("id", "kind")), ("round-1-samples", ("problem_id", "sample")),
                          ("round-1-rejected", ("id", "kind"))):
        mine = sorted(load(tmp_path / "dask" / "self_distill" / folder).to_list(), key=lambda r: [r[k] for k in order])
        reference = sorted(load(tmp_path / "threads" / "self_distill" / folder).to_list(),
                           key=lambda r: [r[k] for k in order])
        assert comparable(mine) == comparable(reference), folder

    (tmp_path / "dask" / ".distillery" / "self_distill" / "round-1.json").unlink()  # the round, redone from its shards
    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        again = run_self_distill(with_execution(write_sd_recipe(
            tmp_path / "dask.yaml", tmp_path / "problems.jsonl", dead.base_url, tmp_path / "dask"),
            {"task_runner": "dask", "address": dask_scheduler}))
    assert dead.requests == [] and again["rounds"][0]["examples"] == ours["examples"]
    progress = json.loads((tmp_path / "dask" / ".distillery" / "progress.json").read_text())
    assert {s["name"]: (s["done"], s["total"]) for s in progress["stages"]} == {
        "sample[r1]": (20, 20), "grade + teacher part[r1]": (5, 5)}


def _leakage_rows(folder):
    rows = datasets.load_dataset(str(folder), split="train").to_list()
    return sorted(comparable(rows), key=lambda r: (r["teacher"], r["prompt_index"]))


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_leakage_on_a_local_ray_runtime_gives_the_threads_output_and_a_rerun_sends_nothing(tmp_path):
    needs("prefect_ray")
    from test_leakage_flow import NumberTeacher, write_recipe as write_leakage_recipe

    from flows.leakage import leakage

    reports = {}
    for name, execution in (("threads", {"task_runner": "threads"}), ("ray", {"task_runner": "ray", "workers": 2})):
        with FakeOpenAIServer(NumberTeacher(biased=True)) as server:
            recipe = with_execution(write_leakage_recipe(tmp_path / f"{name}.yaml", server.base_url, tmp_path / name),
                                    execution)
            reports[name] = asyncio.run(leakage(str(recipe)))
        assert len(server.requests) == 800, name  # 400 prompts × 2 teachers, shards of 150: 6 shards
    for figure in ("leak_detected", "p_value", "kept_trait", "kept_control", "top_digits"):
        assert reports["ray"][figure] == reports["threads"][figure], figure
    for folder in ("numbers", "filtered", "rejected"):
        assert _leakage_rows(tmp_path / "ray" / "leakage" / folder) == \
            _leakage_rows(tmp_path / "threads" / "leakage" / folder), folder

    with FakeOpenAIServer(lambda body: Reply(status=500)) as dead:
        again = asyncio.run(leakage(str(with_execution(
            write_leakage_recipe(tmp_path / "ray.yaml", dead.base_url, tmp_path / "ray"),
            {"task_runner": "ray", "workers": 2}))))
    assert dead.requests == [] and again["p_value"] == reports["ray"]["p_value"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_leakage_budget_reached_on_workers_stops_and_a_larger_one_continues(tmp_path, dask_scheduler):
    from test_leakage_flow import NumberTeacher, write_recipe as write_leakage_recipe

    from flows.leakage import leakage

    execution = {"task_runner": "dask", "address": dask_scheduler}
    with FakeOpenAIServer(NumberTeacher(biased=True)) as server:
        recipe = write_leakage_recipe(tmp_path / "r.yaml", server.base_url, tmp_path / "out")
        with pytest.raises(BudgetReached, match=r"budget\.requests"):
            asyncio.run(leakage(str(with_execution(recipe, execution, budget={"requests": 100}))))
        stopped_at = len(server.requests)
        progress = json.loads((tmp_path / "out" / ".distillery" / "progress.json").read_text())
        report = asyncio.run(leakage(str(with_execution(recipe, execution, budget={"requests": 1000}))))
    assert progress["state"] == "stopped by its budget"
    assert 100 <= stopped_at <= 2 * 100  # two shards at once, each counting the journal as it found it
    assert len(server.requests) == 800  # the rerun sent only what the first run had not
    assert len({json.dumps(r["messages"]) for r in server.requests}) == 800  # none sent twice
    assert report["kept_trait"] > 0


def test_a_failure_while_submitting_stops_submitting_and_waits_for_the_shards_under_way():
    class Cluster:
        client = SimpleNamespace(nthreads=lambda: {"worker-1": 1, "worker-2": 1})
        submitted: list[_Future] = []

        def submit(self, task, parameters):
            self.submitted.append(_Future(parameters["n"]))
            return self.submitted[-1]

    cluster, seen = Cluster(), []

    def calls():
        for n in range(10):
            if n == 6:
                raise OSError("problems file unreadable")  # reading shard 6's problems fails
            yield {"n": n}

    async def on_finished(done):
        seen.append(done.value)

    async def main():
        mapped = asyncio.create_task(map_on_workers(cluster, None, calls(), on_finished))
        for index in range(6):
            for _ in range(500):
                if len(cluster.submitted) > index:
                    break
                await asyncio.sleep(0.01)
            if index == 2:
                cluster.submitted[0].end()  # shard 0 ends; taking shard 4 then 5 is fine
                cluster.submitted[1].end()
        await asyncio.sleep(0.1)
        cluster.submitted[2].end()  # its end takes shard 6, which fails to read
        await asyncio.sleep(0.1)
        assert not mapped.done()  # shards 3-5 are still under way: waited for, not dropped
        for future in cluster.submitted[3:]:
            future.end()
        return await mapped

    with pytest.raises(OSError, match="problems file unreadable"):
        asyncio.run(main())
    assert len(cluster.submitted) == 6 and sorted(seen) == [0, 1, 2]  # the shard that ended with the failure counted
