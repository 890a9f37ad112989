"""Push a run's published dataset folders to one Hugging Face Hub dataset repo.

In:  the recipe's `publish.push_to_hub` (a `HubSpec`) and the folders `publish_dataset`
     wrote, by name ({"composites": out/composites, "trajectories": ..., ...}).
Out: one commit to `repo_id` (created, private by default, if missing) holding

    <name>/data/<split>-0000i-of-0000N.parquet   each folder's data files, byte for byte
    <name>/manifest.json                         each folder's manifest
    README.md                                    one `configs` entry per name (the first is the
                                                 default) and each folder's card under a heading

so that `datasets.load_dataset(repo_id, name)` loads each dataset; `state_dir/hub.json`
records the push. Files a previous push left under a pushed `<name>/` are deleted in the
same commit (an old shard would otherwise join the new ones); the rest of the repo is kept.

    push = push_datasets(recipe.publish.push_to_hub, {"composites": out / "composites"},
                         run_name=recipe.run_name, state_dir=out / ".distillery")

Failures raise `HubPushError` naming the repo, the endpoint and the cause. The folders on
disk are only read, so `distillery publish RECIPE.yaml` can push them again alone.
HF_HUB_OFFLINE is honoured, not overridden: whoever set it asked for no Hub traffic, so the
push is refused before anything is sent and says how to retry.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx2
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    DatasetCard,
    DatasetCardData,
    HfApi,
    constants,
)
from huggingface_hub.errors import HfHubHTTPError

from schemas.recipe import HubSpec, Recipe

log = logging.getLogger("distillery.hub")

# Waits between attempts at the whole push. huggingface_hub retries only the preupload
# call itself (5 times); repo creation, listing and the commit are retried here.
RETRY_DELAYS_S: tuple[float, ...] = (5.0, 20.0, 60.0)
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
RETRY_COMMAND = "distillery publish RECIPE.yaml"


class HubPushError(RuntimeError):
    """The push failed; the message says why and how to retry. It never holds the token."""


@dataclass(frozen=True)
class HubPush:
    repo_id: str
    url: str  # the repo's page
    commit: str  # oid of the commit (the current head when nothing had changed)
    commit_url: str
    files: list[str]  # paths in the repo this push wrote
    pushed_at: str  # ISO 8601, UTC


def push_datasets(
    hub: HubSpec, datasets: Mapping[str, Path], *, run_name: str, state_dir: Path
) -> HubPush:
    """Push `datasets` (name -> published folder) in one commit; record it in state_dir/hub.json."""
    endpoint = (hub.endpoint or constants.ENDPOINT).rstrip("/")
    token = os.environ.get(hub.token_env, "").strip()

    def failure(cause: str) -> HubPushError:
        folders = ", ".join(f"{name}: {folder}" for name, folder in datasets.items())
        message = (
            f"pushing to the Hugging Face Hub failed (dataset repo {hub.repo_id} at {endpoint}): {cause}. "
            f"The datasets are untouched on disk ({folders}); once fixed, push them again without "
            f"rerunning anything: {RETRY_COMMAND}"
        )
        return HubPushError(message.replace(token, "***") if token else message)

    if not token:
        raise failure(
            f"publish.push_to_hub.token_env names ${hub.token_env}, which is not set or empty; "
            f"export a Hugging Face write token in it"
        )
    if constants.is_offline_mode():
        raise failure("HF_HUB_OFFLINE is set, so nothing may be sent to the Hub; unset it")
    files = _repo_files(datasets)
    readme = _root_card(hub.repo_id, datasets, run_name).encode()
    api = HfApi(endpoint=endpoint, token=token, library_name="distillery")

    with _no_implicit_calls():
        url, commit = _with_retries(
            lambda: _push_once(api, hub, files, readme, run_name), hub, failure
        )
    push = HubPush(
        repo_id=hub.repo_id,
        url=url,
        commit=commit.oid,
        commit_url=commit.commit_url,
        files=sorted([*files, "README.md"]),
        pushed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    _write_json(Path(state_dir) / "hub.json", asdict(push))
    log.info("pushed %d files to %s (commit %s)", len(push.files), push.url, push.commit[:8])
    return push


def _repo_files(datasets: Mapping[str, Path]) -> dict[str, Path]:
    files = {}
    for name, folder in datasets.items():
        folder = Path(folder)
        parquet = sorted((folder / "data").glob("*.parquet"))
        if not parquet or not (folder / "manifest.json").is_file():
            raise HubPushError(
                f"cannot push {name!r}: {folder} holds no published dataset "
                f"(data/*.parquet and manifest.json); run the flow first"
            )
        files.update({f"{name}/data/{path.name}": path for path in parquet})
        files[f"{name}/manifest.json"] = folder / "manifest.json"
    return files


def _push_once(
    api: HfApi, hub: HubSpec, files: dict[str, Path], readme: bytes, run_name: str
) -> tuple[str, CommitInfo]:
    url = api.create_repo(hub.repo_id, repo_type="dataset", private=hub.private, exist_ok=True)
    names = {path.split("/", 1)[0] for path in files}
    stale = [
        path
        for path in api.list_repo_files(hub.repo_id, repo_type="dataset")
        if path.split("/", 1)[0] in names and path not in files
    ]
    # Built afresh on each attempt: create_commit marks operations as used.
    operations = [CommitOperationDelete(path, is_folder=False) for path in stale]
    operations += [CommitOperationAdd(path, str(local)) for path, local in files.items()]
    operations.append(CommitOperationAdd("README.md", readme))
    # Identical content is no error: huggingface_hub skips unchanged files and, when
    # nothing is left, returns the current head instead of committing.
    commit = api.create_commit(
        hub.repo_id,
        operations,
        commit_message=f"Publish {run_name} (distillery)",
        repo_type="dataset",
    )
    return str(url), commit


def _with_retries(
    push_once: Callable[[], tuple[str, CommitInfo]],
    hub: HubSpec,
    failure: Callable[[str], HubPushError],
) -> tuple[str, CommitInfo]:
    for attempt in range(1, len(RETRY_DELAYS_S) + 2):
        try:
            return push_once()
        except HfHubHTTPError as err:
            status = err.response.status_code
            if status not in TRANSIENT_STATUSES or attempt > len(RETRY_DELAYS_S):
                raise failure(_http_cause(err, hub, attempt)) from err
            reason = f"HTTP {status}"
        except httpx2.TransportError as err:
            if attempt > len(RETRY_DELAYS_S):
                raise failure(
                    f"could not reach it, {attempt} attempts ({type(err).__name__}: {err})"
                ) from err
            reason = type(err).__name__
        delay = RETRY_DELAYS_S[attempt - 1]
        log.warning("push to %s: %s; retrying in %gs", hub.repo_id, reason, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


def _http_cause(err: HfHubHTTPError, hub: HubSpec, attempts: int) -> str:
    status = err.response.status_code
    namespace = hub.repo_id.split("/", 1)[0]
    if status in (401, 403):
        return (
            f"the token in ${hub.token_env} was refused (HTTP {status}); it needs write access "
            f"to the {namespace!r} namespace"
        )
    if status == 404:
        return (
            f"HTTP 404: the namespace {namespace!r} does not exist or the token in "
            f"${hub.token_env} cannot see it; check publish.push_to_hub.repo_id"
        )
    detail = err.server_message or str(err).splitlines()[0]
    if status in TRANSIENT_STATUSES:
        return f"HTTP {status}, still failing after {attempts} attempts ({detail})"
    return f"HTTP {status} ({detail})"


@contextmanager
def _no_implicit_calls():
    # With telemetry on, huggingface_hub builds its user agent by fetching an "agent
    # harness" list from the default endpoint (huggingface.co, whatever `endpoint` is).
    saved = constants.HF_HUB_DISABLE_TELEMETRY
    constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_TELEMETRY = saved


# --- the repo's README.md ----------------------------------------------------------


def _root_card(repo_id: str, datasets: Mapping[str, Path], run_name: str) -> str:
    """One config per dataset, built from each folder's own card, so it is the same for the same folders."""
    data = DatasetCardData(pretty_name=run_name)
    configs, infos, tags, sizes = MetadataConfigs(), DatasetInfosDict(), [], []
    listing, sections = [], []
    for index, (name, folder) in enumerate(datasets.items()):
        card = DatasetCard.load(Path(folder) / "README.md")
        (own,) = MetadataConfigs.from_dataset_card_data(card.data).values()
        configs[name] = {"data_files": [_under(name, files) for files in own["data_files"]]}
        if index == 0:
            configs[name]["default"] = True
        infos.update({name: info for info in DatasetInfosDict.from_dataset_card_data(card.data).values()})
        tags += [tag for tag in card.data.tags or [] if tag not in tags]
        sizes += [size for size in card.data.size_categories or [] if size not in sizes]
        rows = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))["num_rows"]
        listing.append(f'- `{name}` ({rows:,} rows): `load_dataset("{repo_id}", "{name}")`')
        sections.append(f"## `{name}`\n\n{_demote(card.text.strip(), 2)}")
    data.tags, data.size_categories = tags or None, sizes or None
    configs.to_dataset_card_data(data)
    infos.to_dataset_card_data(data)
    intro = f"Datasets published by the Distillery run `{run_name}`, one config each:"
    body = "\n\n".join([f"# {run_name}", intro, "\n".join(listing), *sections])
    return f"---\n{data.to_yaml()}\n---\n\n{body}\n"


def _under(name: str, data_files: dict) -> dict:
    """{"split": "train", "path": "data/train-*"} -> the same under `name/`."""
    path = data_files["path"]
    prefixed = [f"{name}/{p}" for p in path] if isinstance(path, list) else f"{name}/{path}"
    return {"split": data_files["split"], "path": prefixed}


def _demote(markdown: str, levels: int) -> str:
    """Push headings `levels` deeper, leaving fenced code (YAML comments) alone."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            line = "#" * levels + line
        lines.append(line)
    return "\n".join(lines)


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)  # a reader never sees half a file


def job_datasets(recipe: Recipe, job: str) -> dict[str, Path]:
    """The dataset folders a finished run of `job` left in its work dir, by config name, the
    training rows first (they become the repo's default config)."""
    base = recipe.work_dir
    if job == "dualdistill":
        folders = {name: base / name for name in ("composites", "trajectories", "rejected")}
    elif job == "leakage":
        folders = {name: base / "leakage" / name for name in ("filtered", "numbers", "rejected")}
    else:
        rounds = sorted((p for p in (base / "self_distill").glob("round-*") if (p / "README.md").exists()),
                        key=lambda p: (-int(p.name.split("-")[1]), p.name))  # the last round's examples first
        folders = {p.name: p for p in rounds}
    missing = [str(folder) for folder in folders.values() if not (folder / "README.md").exists()]
    if missing or not folders:
        raise HubPushError(f"nothing to push for {recipe.run_name}: no published dataset at "
                           f"{', '.join(missing) or base}; run the recipe first")
    return folders


def push_run(recipe: Recipe, job: str) -> HubPush:
    """Push what a finished run of `job` published to `recipe.publish.push_to_hub`."""
    hub = recipe.publish.push_to_hub
    if hub is None:
        raise HubPushError(f"{recipe.run_name}: the recipe has no `publish.push_to_hub` (repo_id, private, token_env)")
    return push_datasets(hub, job_datasets(recipe, job), run_name=recipe.run_name, state_dir=recipe.state_dir)
