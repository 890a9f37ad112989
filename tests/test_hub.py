"""flows/publishing/hub.py: published folders pushed to a loopback fake of the Hub, one commit."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import datasets
import huggingface_hub
import pytest
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard
from pydantic import BaseModel

from fake_hub import FakeHub
from flows.publishing import hub as hub_module
from flows.publishing.hub import HubPushError, push_datasets
from flows.publishing.parquet import DatasetCardInfo, features_for, publish_dataset
from schemas.recipe import HubSpec

REPO = "distillery-org/demo-run"
TOKEN = "hf_test_write_token_123"
TOKEN_ENV = "DISTILLERY_TEST_HF_TOKEN"
EXPECTED_CALLS = {"create", "tree", "validate-yaml", "preupload", "commit", "info"}


class Row(BaseModel):
    id: str
    answer: int
    messages: list[dict[str, str]]


ROWS = [
    Row(id=f"p{i}", answer=i * i, messages=[{"role": "user", "content": f"q{i}"}]) for i in range(5)
]
REJECTED = [{"id": "p9", "reason": "both wrong"}, {"id": "p10", "reason": "both wrong"}]
REJECTED_FEATURES = datasets.Features({"id": datasets.Value("string"), "reason": datasets.Value("string")})


def card(title: str) -> DatasetCardInfo:
    return DatasetCardInfo(
        title=title,
        description=f"What a {title} row is.",
        sections={"Recipe": "```yaml\n# a comment, not a heading\nseed: 1\n```"},
        tags=["distillation", title],
    )


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    out = tmp_path / "out"
    publish_dataset(out / "composites", ROWS, features_for(Row), card("composites"), rows_per_file=2)
    publish_dataset(out / "rejected", REJECTED, REJECTED_FEATURES, card("rejected"))
    return {"composites": out / "composites", "rejected": out / "rejected"}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    with FakeHub(tokens={TOKEN}) as server:
        # conftest sets HF_HUB_OFFLINE=1, which huggingface_hub read into `constants` at
        # import and checks before every request: lift it for the loopback.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        # Any call to the *default* endpoint (telemetry, agent detection) lands in the
        # fake too, so `assert_only_hub_api_calls` sees it.
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"))
        monkeypatch.setattr(huggingface_hub.utils._detect_agent, "_registry", None, raising=False)
        monkeypatch.setattr(hub_module, "RETRY_DELAYS_S", (0.01, 0.01))
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        yield server


@pytest.fixture
def spec(fake) -> HubSpec:
    return HubSpec(repo_id=REPO, token_env=TOKEN_ENV, endpoint=fake.url)


def push(spec: HubSpec, folders: dict[str, Path], state_dir: Path):
    return push_datasets(spec, folders, run_name="demo-run", state_dir=state_dir)


def assert_only_hub_api_calls(fake: FakeHub) -> None:
    assert set(fake.actions()) <= EXPECTED_CALLS, fake.requests
    assert {r.authorization for r in fake.requests} == {f"Bearer {TOKEN}"}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_commits_every_file_in_one_private_dataset_repo(fake, spec, folders, tmp_path):
    state = tmp_path / "state"
    result = push(spec, folders, state)

    repo = fake.repos[REPO]
    assert (repo.repo_type, repo.private) == ("dataset", True)
    assert fake.calls("create") == 1 and fake.calls("commit") == 1
    assert_only_hub_api_calls(fake)
    for name, folder in folders.items():
        parquet = sorted((folder / "data").glob("*.parquet"))
        assert parquet and [repo.files[f"{name}/data/{p.name}"] for p in parquet] == [p.read_bytes() for p in parquet]
        assert repo.files[f"{name}/manifest.json"] == (folder / "manifest.json").read_bytes()
    assert len([p for p in repo.files if p.startswith("composites/data/")]) == 3

    readme = DatasetCard(repo.files["README.md"].decode())
    configs = MetadataConfigs.from_dataset_card_data(readme.data)
    assert configs == {
        "composites": {"data_files": [{"split": "train", "path": "composites/data/train-*"}], "default": True},
        "rejected": {"data_files": [{"split": "train", "path": "rejected/data/train-*"}]},
    }
    assert configs.get_default_config_name() == "composites"
    infos = datasets.info.DatasetInfosDict.from_dataset_card_data(readme.data)
    assert infos["rejected"].features == REJECTED_FEATURES and infos["composites"].splits["train"].num_examples == 5
    assert readme.text.index("## `composites`") < readme.text.index("### composites") < readme.text.index("## `rejected`")
    assert "\n# a comment, not a heading\n" in readme.text
    assert "---" not in readme.text  # the folders' own front matter is not repeated

    assert result.repo_id == REPO and result.commit == repo.head
    assert result.url == f"{fake.url}/datasets/{REPO}"
    assert result.files == sorted(set(repo.files) - {".gitattributes"})
    assert json.loads((state / "hub.json").read_text()) == asdict(result)


def test_pushed_repo_loads_with_datasets(fake, spec, folders, tmp_path, monkeypatch):
    push(spec, folders, tmp_path / "state")
    clone = tmp_path / "clone"  # the repo as `load_dataset` would see it, read locally
    for path, data in fake.repos[REPO].files.items():
        (clone / path).parent.mkdir(parents=True, exist_ok=True)
        (clone / path).write_bytes(data)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cache = str(tmp_path / "hf-cache")

    composites = datasets.load_dataset(str(clone), "composites", split="train", cache_dir=cache)
    assert composites.to_list() == [row.model_dump() for row in ROWS]
    assert datasets.load_dataset(str(clone), split="train", cache_dir=cache).to_list() == composites.to_list()
    rejected = datasets.load_dataset(str(clone), "rejected", split="train", cache_dir=cache)
    assert rejected.to_list() == REJECTED and rejected.features == REJECTED_FEATURES


def test_identical_push_succeeds_and_stale_shards_are_removed(fake, spec, folders, tmp_path):
    state = tmp_path / "state"
    first = push(spec, folders, state)
    again = push(spec, folders, state)
    assert again.commit == first.commit and fake.calls("commit") == 1  # nothing changed: no commit
    assert json.loads((state / "hub.json").read_text())["commit"] == first.commit

    publish_dataset(folders["composites"], ROWS, features_for(Row), card("composites"), rows_per_file=10)
    third = push(spec, folders, state)
    files = fake.repos[REPO].files
    assert [p for p in files if p.startswith("composites/data/")] == ["composites/data/train-00000-of-00001.parquet"]
    assert ".gitattributes" in files and third.commit == fake.repos[REPO].head != first.commit
    assert_only_hub_api_calls(fake)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_missing_token_fails_before_anything_is_sent(fake, spec, folders, tmp_path, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(TOKEN_ENV)
    else:
        monkeypatch.setenv(TOKEN_ENV, value)
    with pytest.raises(HubPushError) as caught:
        push(spec, folders, tmp_path / "state")
    assert "publish.push_to_hub.token_env" in str(caught.value)
    assert f"${TOKEN_ENV}" in str(caught.value) and "distillery publish" in str(caught.value)
    assert fake.requests == [] and not (tmp_path / "state").exists()


def test_offline_mode_is_honoured(fake, spec, folders, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push(spec, folders, tmp_path / "state")
    assert fake.requests == []


@pytest.mark.parametrize("status", [500, 429, 0])  # 0: the connection drops
def test_transient_commit_failures_are_retried(fake, spec, folders, tmp_path, status, caplog):
    caplog.set_level("DEBUG")
    fake.fail_next("commit", 2, status)
    result = push(spec, folders, tmp_path / "state")
    assert fake.calls("commit") == 3 and result.commit == fake.repos[REPO].head
    assert "composites/manifest.json" in fake.repos[REPO].files
    assert TOKEN not in caplog.text


def test_lasting_failure_leaves_everything_and_a_retry_alone_succeeds(fake, spec, folders, tmp_path):
    state = tmp_path / "state"
    before = snapshot(tmp_path / "out")
    fake.fail_next("commit", 100, 500)
    with pytest.raises(HubPushError) as caught:
        push(spec, folders, state)
    message = str(caught.value)
    for part in (REPO, fake.url, "HTTP 500", "distillery publish RECIPE.yaml", str(folders["rejected"])):
        assert part in message
    assert fake.calls("commit") == len(hub_module.RETRY_DELAYS_S) + 1
    assert snapshot(tmp_path / "out") == before and not (state / "hub.json").exists()

    fake.fail_next("commit", 0, 500)  # the hub recovers
    pushed = push(spec, folders, state)
    recorded = (state / "hub.json").read_text()
    assert json.loads(recorded)["commit"] == pushed.commit == fake.repos[REPO].head

    fake.fail_next("commit", 100, 503)
    publish_dataset(folders["rejected"], REJECTED[:1], REJECTED_FEATURES, card("rejected"))
    with pytest.raises(HubPushError):
        push(spec, folders, state)
    assert (state / "hub.json").read_text() == recorded  # the last good push stays recorded


@pytest.mark.parametrize("refusal", ["unknown token", "commit 401", "commit 403"])
def test_refused_token_names_the_variable_not_the_token(fake, spec, folders, tmp_path, refusal):
    if refusal == "unknown token":
        fake.tokens = {"hf_someone_else"}
    else:
        fake.fail_next("commit", 1, int(refusal.split()[1]))
    with pytest.raises(HubPushError) as caught:
        push(spec, folders, tmp_path / "state")
    message = str(caught.value)
    assert f"token in ${TOKEN_ENV} was refused" in message and REPO in message
    assert TOKEN not in message and TOKEN not in repr(caught.value.__context__)
    assert fake.calls("commit") <= 1  # not retried
    assert not (tmp_path / "state" / "hub.json").exists()


def test_unknown_namespace_is_named(spec, folders, tmp_path, monkeypatch):
    with FakeHub(tokens={TOKEN}, namespaces={"someone-else"}) as other:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        with pytest.raises(HubPushError) as caught:
            push(spec.model_copy(update={"endpoint": other.url}), folders, tmp_path / "state")
    assert "HTTP 404" in str(caught.value) and "namespace 'distillery-org'" in str(caught.value)
    assert other.calls("commit") == 0


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_pushes_at_the_end_and_a_failed_push_is_retried_alone(fake, tmp_path):
    """The DualDistill flow with `publish.push_to_hub`: a push that keeps failing fails the run
    after everything is on disk; `distillery publish RECIPE` then pushes alone, sending no
    model request."""
    import asyncio

    from fake_openai import FakeOpenAIServer
    from flow_helpers import ScriptedTeachers, write_problems, write_recipe
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.dualdistill import dualdistill

    rows = write_problems(tmp_path / "problems.jsonl", per_kind=1)
    hub = {"push_to_hub": {"repo_id": REPO, "token_env": TOKEN_ENV, "endpoint": fake.url, "private": False}}
    fake.fail_next("commit", 10, 500)
    with FakeOpenAIServer(ScriptedTeachers(rows)) as server:
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "problems.jsonl", server.base_url, tmp_path / "out",
                              publish=hub)
        with pytest.raises(HubPushError, match="distillery publish"):
            asyncio.run(dualdistill(str(recipe)))
        sent = len(server.requests)
        assert (tmp_path / "out" / "composites" / "README.md").exists()
        assert json.loads((tmp_path / "out" / ".distillery" / "progress.json").read_text())["state"] == "completed"

        fake.fail_next("commit", 0, 500)
        result = CliRunner().invoke(app, ["publish", str(recipe)])
        assert result.exit_code == 0, result.output
        assert len(server.requests) == sent  # the push alone: no model request

    pushed = json.loads(result.stdout)
    assert pushed["repo_id"] == REPO
    repo = fake.repos[REPO]
    assert not repo.private
    composites = sorted(path for path in repo.files if path.startswith("composites/data/"))
    assert composites and all(repo.files[path] == (tmp_path / "out" / path).read_bytes() for path in composites)
    assert {"trajectories/manifest.json", "rejected/manifest.json", "README.md"} <= set(repo.files)
    assert json.loads((tmp_path / "out" / ".distillery" / "hub.json").read_text())["commit"] == pushed["commit"]
