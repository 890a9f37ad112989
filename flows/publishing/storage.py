"""`output_dir` as a URL (s3://bucket/prefix, gs://…): a local mirror synced with the URL.

Why a mirror: everything that writes a run's files needs a local file system — the request
journal appends and flushes line by line, `publish_dataset` builds a folder and swaps it
in, object stores have neither append nor rename. So a run always writes
`recipe.work_dir` (for a URL, a folder under ~/.cache/distillery/outputs/), and:

- `check_output` fails at once when the URL cannot be written (package, bucket, rights);
- `pull_state` brings the URL's `.distillery/` (journal, run token…) into the mirror, so a
  run on a fresh machine resumes where the last one stopped;
- `push_state` uploads what changed in `.distillery/` (after each shard, and on failure); it
  only warns when the store is unreachable, since the mirror keeps everything and the next
  push (at the latest `push_outputs`, which does raise) sends it;
- `push_outputs` uploads the datasets at the end; a dataset folder is replaced whole;
- `result_storage` keeps Prefect's cached stage results at `<url>/.distillery/prefect-results`
  (for a local `output_dir`, in its own `.distillery/prefect-results`);
- `output_location` names a mirror path as the user should see it (its URL).

Credentials and endpoints come from the environment, as for any fsspec client: AWS_*
variables, AWS_ENDPOINT_URL for S3-compatible stores, FSSPEC_S3_* for other s3fs options.
For a local `output_dir` every function but `result_storage` is a no-op.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import uuid
from pathlib import Path

import fsspec
from fsspec import AbstractFileSystem
from prefect.filesystems import RemoteFileSystem

from schemas.recipe import Recipe

STATE = ".distillery"  # recipe.state_dir, relative to work_dir
RESULTS = "prefect-results"  # under STATE; at a URL, never pulled into a mirror
RUN_LOCK = "run.lock"  # under STATE: the mirror's run lock (flows/orchestration/run_lock.py), never synced
_INSTALL_HINTS = {"s3": "distillery[s3] (s3fs)", "s3a": "distillery[s3] (s3fs)"}

# (url, path relative to work_dir) -> (size, mtime_ns) of the local file when it last matched the URL
_in_sync: dict[tuple[str, str], tuple[int, int]] = {}
_lock = threading.Lock()  # pushes run in threads, one per finished shard
log = logging.getLogger("distillery.storage")


class OutputLocationError(RuntimeError):
    """`output_dir` is a URL that cannot be used; the message names it and says why."""


def check_output(recipe: Recipe) -> None:
    """Fail before any model call when `output_dir` is a URL this machine cannot write."""
    if (url := recipe.remote_output) is None:
        return
    fs, root = _filesystem(url)
    probe = f"{root}/{STATE}/write-probe-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except FileNotFoundError:
        bucket = root.split("/")[0]
        raise OutputLocationError(
            f"output_dir {url}: bucket {bucket!r} does not exist (create it, or check the endpoint and credentials)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - whatever the store says, name the URL with it
        raise OutputLocationError(f"output_dir {url}: cannot write there: {type(exc).__name__}: {exc}") from None


def pull_state(recipe: Recipe, only: str | None = None) -> None:
    """Download the URL's `.distillery/` (or its folder `only`, e.g. "journal") into the mirror.
    Journal files present on both sides with different lengths are merged line by line (they
    are append-only, so the same length is taken as the same content; no local line is ever
    lost); other state files (run token, summaries) are taken from the URL."""
    if (url := recipe.remote_output) is None:
        return
    fs, root = _filesystem(url)
    remote_state = f"{root}/{STATE}"
    fs.invalidate_cache(remote_state)
    wanted = {}
    for remote, info in fs.find(f"{remote_state}/{only}" if only else remote_state, detail=True).items():
        relative = remote[len(remote_state) + 1 :]
        local = recipe.state_dir / relative
        if relative.split("/")[0] in (RESULTS, "journal.index", RUN_LOCK):
            continue
        if local.suffix == ".jsonl" and local.exists() and local.stat().st_size == info["size"]:
            continue
        wanted[remote] = local
    with _lock:
        for remote, data in (fs.cat(list(wanted)) if wanted else {}).items():
            local = wanted[remote]
            local.parent.mkdir(parents=True, exist_ok=True)
            if local.suffix == ".jsonl" and local.exists() and not data.startswith(local.read_bytes()):
                _append_missing_lines(local, data)  # stays out of sync: the next push uploads the union
            else:
                local.write_bytes(data)
                _remember(url, recipe.work_dir, [(local, _stamp(local))])


def push_state(recipe: Recipe, only: str | None = None) -> None:
    """Upload the files of the mirror's `.distillery/` (or of its folder `only`) that changed
    since they last matched the URL (cheap when nothing did). A journal file is cut after its last complete line.
    A failure is logged, never raised: it must not fail a shard or hide a run's own error."""
    try:
        _push_state(recipe, only)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("output_dir %s: could not upload the run's state (%s: %s); it stays in %s and goes "
                    "with the next push", recipe.output_dir, type(exc).__name__, exc, recipe.state_dir)


def _push_state(recipe: Recipe, only: str | None = None) -> None:
    if (url := recipe.remote_output) is None:
        return
    fs, root = _filesystem(url)
    with _lock:
        changed = _changed(url, recipe.work_dir, _files(recipe.state_dir / only if only else recipe.state_dir))
        contents = {}
        for path, _ in changed:
            data = path.read_bytes()
            if path.suffix == ".jsonl":
                data = data[: data.rfind(b"\n") + 1]
            contents[_remote_path(root, recipe, path)] = data
        if contents:
            fs.pipe(contents)
        _remember(url, recipe.work_dir, changed)


def push_outputs(recipe: Recipe) -> None:
    """Upload the whole mirror: the datasets, then the state (whose markers say they are
    done). Each dataset folder (one with a manifest.json) is replaced whole: files it no
    longer has are deleted."""
    if (url := recipe.remote_output) is None:
        return
    fs, root = _filesystem(url)
    with _lock:
        work_dir = recipe.work_dir
        # hidden entries are the state (pushed below) and publish_dataset's staging folders
        files = [p for p in _files(work_dir) if not any(part.startswith(".") for part in p.relative_to(work_dir).parts)]
        changed = _changed(url, work_dir, files)
        if changed:
            fs.put([str(p) for p, _ in changed], [_remote_path(root, recipe, p) for p, _ in changed])
        _remember(url, work_dir, changed)
        for dataset in {p.parent for p in files if p.name == "manifest.json"}:
            remote_dataset = _remote_path(root, recipe, dataset)
            fs.invalidate_cache(remote_dataset)
            kept = {_remote_path(root, recipe, p) for p in files if dataset in p.parents}
            stale = [path for path in fs.find(remote_dataset) if path not in kept]
            if stale:
                fs.rm(stale)
    _push_state(recipe)


def result_storage(recipe: Recipe) -> Path | RemoteFileSystem:
    """Where Prefect keeps the run's cached stage results, for `task.with_options(result_storage=...)`:
    `.distillery/prefect-results` of the output, beside the journal. At a URL, a rerun on any
    machine hits the cache; for a local folder (a path: Prefect's own local file system), the
    results go, and can be deleted, with the run's other files, not to Prefect's default
    `~/.prefect/storage`, where nothing removes them."""
    if (url := recipe.remote_output) is None:
        return (recipe.state_dir / RESULTS).absolute()
    return _results_block(url)


@functools.cache  # one block per URL and process, however many tasks use it
def _results_block(url: str) -> RemoteFileSystem:
    block = RemoteFileSystem(basepath=f"{url.rstrip('/')}/{STATE}/{RESULTS}")
    # a task refuses a block that is not saved on the Prefect server
    block.save(f"distillery-results-{hashlib.sha256(url.encode()).hexdigest()[:16]}", overwrite=True, _sync=True)
    return block


def fetch_state(url: str, into: Path) -> None:
    """Copy the URL's `.distillery/` (not Prefect's results) into `into`: what `distillery
    status` reads of a run whose output_dir is a URL."""
    fs, root = _filesystem(url)
    remote_state = f"{root.rstrip('/')}/{STATE}"
    fs.invalidate_cache(remote_state)
    files = [p for p in fs.find(remote_state) if p[len(remote_state) + 1 :].split("/")[0] != RESULTS]
    for remote, data in (fs.cat(files) if files else {}).items():
        local = into / remote[len(remote_state) + 1 :]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)


def output_location(recipe: Recipe, path: str | Path) -> str:
    """`path` as the user should see it: for a remote output_dir, a path in the mirror becomes its URL."""
    url, path = recipe.remote_output, Path(path)
    if url is None or not path.is_relative_to(recipe.work_dir):
        return str(path)
    return f"{url.rstrip('/')}/{path.relative_to(recipe.work_dir).as_posix()}"


def _filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        protocol = url.split("://")[0]
        hint = f"install {_INSTALL_HINTS[protocol]}" if protocol in _INSTALL_HINTS else str(exc)
        raise OutputLocationError(f"output_dir {url}: {hint}") from None
    except ValueError as exc:  # an unknown protocol
        raise OutputLocationError(f"output_dir {url}: {exc}") from None
    return fs, root.rstrip("/")


def _files(folder: Path) -> list[Path]:
    """Files to sync, without what stays on this machine: the journal's index (`journal.index/`,
    a cache rebuilt from the JSONL files wherever they are read), the row spool (`spool/`,
    this run's finished rows on their way into its datasets), the run's problems
    (`problems/`, written anew by every run from its source) and the mirror's run lock."""
    if not folder.exists():
        return []
    return [p for p in folder.rglob("*") if p.is_file() and not _stays_here(p.relative_to(folder).parts)]


def _stays_here(parts: tuple[str, ...]) -> bool:
    return parts[0] in ("spool", "problems", RUN_LOCK) or any(part.endswith(".index") for part in parts)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _changed(url: str, work_dir: Path, files: list[Path]) -> list[tuple[Path, tuple[int, int]]]:
    # stamped before reading: a file that grows while it uploads is uploaded again next time
    stamped = [(path, _stamp(path)) for path in files]
    return [(path, stamp) for path, stamp in stamped
            if _in_sync.get((url, path.relative_to(work_dir).as_posix())) != stamp]


def _remember(url: str, work_dir: Path, synced: list[tuple[Path, tuple[int, int]]]) -> None:
    for path, stamp in synced:
        _in_sync[(url, path.relative_to(work_dir).as_posix())] = stamp


def _remote_path(root: str, recipe: Recipe, path: Path) -> str:
    return f"{root}/{path.relative_to(recipe.work_dir).as_posix()}"


def _append_missing_lines(path: Path, remote: bytes) -> None:
    """Both sides wrote lines the other lacks (two machines on one shard): keep the union."""
    local = path.read_bytes()
    known = set(local.splitlines())
    missing = [line for line in remote.splitlines() if line and line not in known]
    with path.open("ab") as handle:
        if local and not local.endswith(b"\n"):
            handle.write(b"\n")  # a line cut short by a crash stays one unreadable line
        handle.writelines(line + b"\n" for line in missing)
