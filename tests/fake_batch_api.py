"""A loopback fake of OpenAI's Files + Batches API, for batch-mode tests.

    with FakeBatchAPI(responder, polls_to_finish=2) as api:
        ... point a `mode: batch` teacher at api.base_url ...
        api.creations, api.uploads, api.polls   # what the client did
        api.requests                            # every request body it answered, in order

It serves what the openai SDK calls: POST /v1/files (multipart), GET /v1/files/{id}/content,
POST /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel. A batch ends on its
`polls_to_finish`-th poll: each input line is answered by `responder(body) -> Reply`
(tests/fake_openai.py); a reply with a non-200 status goes to the error file. `outcome`
makes batches end `failed`, `expired` or `cancelled` instead (the last two answering their
first `partial` lines, as a provider does with what it finished). `stop()` / `start()` kill and
restart the server on the same port with its files and batches kept.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fake_openai import Reply, Responder, completion_body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FakeBatchAPI:
    def __init__(self, responder: Responder, polls_to_finish: int = 1, outcome: str = "completed") -> None:
        self.responder = responder
        self.polls_to_finish = polls_to_finish
        self.outcome = outcome  # completed | failed | expired | cancelled
        self.partial = 0  # lines an expired or cancelled batch still answered
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.creations = self.uploads = self.polls = 0
        self._polls_of: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._port = 0
        self._server: _Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def start(self) -> FakeBatchAPI:
        self._server = _Server(("127.0.0.1", self._port), self._handler_class())
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeBatchAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the API ----------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def upload(self, filename: str, data: bytes, purpose: str) -> dict[str, Any]:
        with self._lock:
            self.uploads += 1
            file_id = self._new_id("file")
            self.files[file_id] = data
        return {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}

    def create(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if params.get("input_file_id") not in self.files:
            return 404, {"error": {"message": f"no file {params.get('input_file_id')}", "type": "invalid_request"}}
        with self._lock:
            self.creations += 1
            batch = {
                "id": self._new_id("batch"), "object": "batch", "endpoint": params["endpoint"],
                "input_file_id": params["input_file_id"], "completion_window": params["completion_window"],
                "status": "validating", "created_at": int(time.time()), "output_file_id": None,
                "error_file_id": None, "errors": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
            }
            self.batches[batch["id"]] = batch
            self._polls_of[batch["id"]] = 0
        return 200, batch

    def retrieve(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return None
            self.polls += 1
            self._polls_of[batch_id] += 1
            if batch["status"] in ("validating", "in_progress"):
                if self._polls_of[batch_id] >= self.polls_to_finish:
                    self._finish(batch)
                else:
                    batch["status"] = "in_progress"
            return dict(batch)

    def cancel(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is not None and batch["status"] not in ("completed", "failed", "expired"):
                batch["status"] = "cancelled"
            return None if batch is None else dict(batch)

    def _finish(self, batch: dict[str, Any]) -> None:
        lines = [json.loads(line) for line in self.files[batch["input_file_id"]].decode().splitlines() if line]
        if self.outcome == "failed":
            batch["status"] = "failed"
            batch["errors"] = {"object": "list", "data": [
                {"code": "invalid_request", "message": "the fake refuses this batch", "line": 1, "param": None}]}
            return
        outputs, errors = [], []
        if self.outcome in ("expired", "cancelled"):
            code = "batch_expired" if self.outcome == "expired" else "batch_cancelled"
            errors = [{"id": f"req-{i}", "custom_id": line["custom_id"], "response": None,
                       "error": {"code": code, "message": f"This request could not be executed before the batch "
                                                         f"was {self.outcome}."}}
                      for i, line in enumerate(lines) if i >= self.partial]
            lines = lines[: self.partial]
        for i, line in enumerate(lines):
            body = line["body"]
            self.requests.append(body)
            reply: Reply = self.responder(body)
            if reply.status != 200 or reply.raw_body is not None:
                error_body = {"error": {"message": f"fake error {reply.status}", "type": "fake"}}
                errors.append({"id": f"req-{i}", "custom_id": line["custom_id"], "error": None,
                               "response": {"status_code": reply.status, "request_id": f"r{i}", "body": error_body}})
            else:
                outputs.append({"id": f"req-{i}", "custom_id": line["custom_id"], "error": None,
                                "response": {"status_code": 200, "request_id": f"r{i}",
                                             "body": completion_body(body, reply)}})
        batch["status"] = self.outcome
        batch["request_counts"] = {"total": len(outputs) + len(errors), "completed": len(outputs),
                                   "failed": len(errors)}
        batch["output_file_id"] = self._store(outputs) if outputs else None
        batch["error_file_id"] = self._store(errors) if errors else None

    def _store(self, rows: list[dict[str, Any]]) -> str:
        file_id = self._new_id("file")
        self.files[file_id] = "".join(json.dumps(row) + "\n" for row in rows).encode()
        return file_id

    # --- HTTP -----------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self) -> None:
                self._send(404, {"error": {"message": f"no such thing: {self.path}", "type": "invalid_request"}})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self) -> None:  # noqa: N802
                if match := re.fullmatch(r"/v1/files/([^/]+)/content", self.path):
                    data = fake.files.get(match[1])
                    self._send(200, data, "application/octet-stream") if data is not None else self._not_found()
                elif match := re.fullmatch(r"/v1/batches/([^/]+)", self.path):
                    batch = fake.retrieve(match[1])
                    self._send(200, batch) if batch is not None else self._not_found()
                else:
                    self._not_found()

            def do_POST(self) -> None:  # noqa: N802
                raw = self._body()
                if self.path == "/v1/files":
                    form = email.message_from_bytes(
                        f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw,
                        policy=email.policy.HTTP)
                    fields = {part.get_param("name", header="content-disposition"): part for part in form.iter_parts()}
                    upload = fields["file"]
                    purpose = fields["purpose"].get_payload(decode=True).decode()
                    self._send(200, fake.upload(upload.get_filename() or "upload", upload.get_payload(decode=True),
                                                purpose))
                elif self.path == "/v1/batches":
                    self._send(*fake.create(json.loads(raw or b"{}")))
                elif match := re.fullmatch(r"/v1/batches/([^/]+)/cancel", self.path):
                    batch = fake.cancel(match[1])
                    self._send(200, batch) if batch is not None else self._not_found()
                else:
                    self._not_found()

        return Handler
