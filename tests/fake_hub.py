"""A loopback fake of the Hugging Face Hub API: just what huggingface_hub 2.4's
`create_repo`, `list_repo_files` and `create_commit` call, with repos kept in memory.

    with FakeHub(tokens={"hf_good"}) as hub:
        HfApi(endpoint=hub.url, token="hf_good").create_repo("org/x", repo_type="dataset")
        hub.repos["org/x"].files    # path -> bytes, as committed
        hub.requests                # every request: method, path, Authorization header
        hub.fail_next("commit", 2, 500)   # the next 2 commits answer 500 (0: hang up)

    POST /api/repos/create                       200 {url}; 409 if it exists; 404 outside `namespaces`
    POST /api/validate-yaml                      200, no errors
    GET  /api/datasets/{id}[/revision/{rev}]     repo info with the head commit (`sha`)
    GET  /api/datasets/{id}/tree/{rev}           every file, in one page
    POST /api/datasets/{id}/preupload/{rev}      uploadMode "regular" for every file (content goes
                                                 inline in the commit: no LFS, no Xet) and the git
                                                 oid of the file already there, if any
    POST /api/datasets/{id}/commit/{rev}         applies the ndjson `file` / `deletedFile` lines

(`models`/`spaces` work the same.) A request without an accepted bearer token gets 401; any
other path gets 404, and every request is recorded, so a test can check nothing else was called.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_REPO_PATH = re.compile(
    r"^/api/(?P<type>model|dataset|space)s/(?P<id>[^/]+/[^/]+)"
    r"(?:/(?P<action>revision|tree|preupload|commit)/(?P<rev>[^/]+))?$"
)
_GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    authorization: str | None


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    files: dict[str, bytes] = field(default_factory=lambda: {".gitattributes": _GITATTRIBUTES})
    commits: list[str] = field(default_factory=list)  # oids, oldest first; the creation is the first

    @property
    def head(self) -> str:
        return self.commits[-1]


def git_oid(content: bytes) -> str:
    """The git blob id, which huggingface_hub compares to skip unchanged regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeHub:
    def __init__(self, tokens: set[str], namespaces: set[str] | None = None) -> None:
        self.tokens = tokens  # accepted bearer tokens
        self.namespaces = namespaces  # where repos may be created; None: anywhere
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._failures: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, action: str, count: int, status: int) -> None:
        """The next `count` calls of `action` ("create", "tree", "preupload", "commit"…)
        answer `status`; 0 closes the connection without an answer."""
        with self._lock:
            self._failures[action] = [status] * count

    def calls(self, action: str) -> int:
        """How many requests reached `action` (failed ones included)."""
        return self.actions().count(action)

    def actions(self) -> list[str]:
        """The action of every request, in order; "unknown" for a path the fake does not serve."""
        return [_action(request.method, request.path) for request in self.requests]

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- the API -------------------------------------------------------------------

    def _answer(self, method: str, path: str, authorization: str | None, body: bytes) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(Request(method, path, authorization))
            action = _action(method, path)
            pending = self._failures.get(action)
            if pending:
                status = pending.pop(0)
                return status, {"error": f"injected failure ({status})"}
            if authorization not in {f"Bearer {token}" for token in self.tokens}:
                return 401, {"error": "Invalid credentials in Authorization header"}
            if action == "create":
                return self._create(json.loads(body))
            if action == "validate-yaml":
                return 200, {"errors": [], "warnings": []}
            match = _REPO_PATH.match(path)
            repo = self.repos.get(match["id"]) if match else None
            if repo is None:
                return 404, {"error": "Repository not found"}
            if action == "info":
                siblings = [{"rfilename": name} for name in sorted(repo.files)]
                return 200, {"id": repo.repo_id, "sha": repo.head, "private": repo.private, "siblings": siblings}
            if action == "tree":
                return 200, [
                    {"type": "file", "path": name, "oid": git_oid(data), "size": len(data)}
                    for name, data in sorted(repo.files.items())
                ]
            if action == "preupload":
                return 200, {"files": [self._upload_mode(repo, f) for f in json.loads(body)["files"]]}
            if action == "commit":
                return self._commit(repo, body)
            return 404, {"error": f"not faked: {method} {path}"}

    def _create(self, payload: dict[str, Any]) -> tuple[int, Any]:
        namespace, name, repo_type = payload["organization"], payload["name"], payload.get("type", "model")
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{prefix}{repo_id}"
        if self.namespaces is not None and namespace not in self.namespaces:
            return 404, {"error": f"Organization {namespace} not found"}
        if repo_id in self.repos:
            return 409, {"error": "You already created this repo", "url": url}
        repo = Repo(repo_id=repo_id, repo_type=repo_type, private=payload.get("visibility") == "private")
        repo.commits.append(hashlib.sha1(repo_id.encode()).hexdigest())
        self.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id}

    @staticmethod
    def _upload_mode(repo: Repo, file: dict[str, Any]) -> dict[str, Any]:
        existing = repo.files.get(file["path"])
        oid = git_oid(existing) if existing is not None else None
        return {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid}

    def _commit(self, repo: Repo, body: bytes) -> tuple[int, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "the first line must be the header"}
        files = dict(repo.files)  # all lines or none
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    return 404, {"error": "A file with this name doesn't exist"}
            else:
                return 400, {"error": f"not faked: commit line {key!r} for {value.get('path')}"}
        repo.files = files
        oid = hashlib.sha1(repo.head.encode() + body).hexdigest()
        repo.commits.append(oid)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return 200, {"commitOid": oid, "commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{oid}"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = urlsplit(self.path).path
                status, payload = hub._answer(self.command, path, self.headers.get("Authorization"), body)
                if status == 0:  # hang up: the client sees the connection drop
                    self.close_connection = True
                    return
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("X-Error-Message", payload["error"])
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def _action(method: str, path: str) -> str:
    if path == "/api/repos/create":
        return "create"
    if path == "/api/validate-yaml":
        return "validate-yaml"
    match = _REPO_PATH.match(path)
    if match is None:
        return "unknown"
    action = match["action"]
    if action in (None, "revision"):
        return "info" if method == "GET" else "unknown"
    return action
