"""A scriptable OpenAI-compatible chat server on loopback, for flow tests and benchmarks.

    with FakeOpenAIServer(responder) as server:
        ... point a teacher at server.base_url ...
        server.requests   # every request body received, in order

`responder(body) -> Reply` decides each answer: content, reasoning, tool calls,
an HTTP error with headers (429 + Retry-After), a garbage body, a delay, or no answer
at all (`drop`). `server.answered` logs every 200 the server wrote, with its times.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    content: str = ""
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # [{"name": "python", "arguments": "{...}"}]
    finish_reason: str = "stop"
    status: int = 200
    raw_body: str | None = None  # sent as is (garbage, or an error body)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float | None = None  # overrides the server's latency
    drop: bool = False  # after the delay, close the connection without answering (a client timeout)


Responder = Callable[[dict[str, Any]], Reply]


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # the default listen backlog of 5 resets connections under load
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away is no news
            super().handle_error(request, client_address)


def completion_body(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning_content is not None:
        message["reasoning_content"] = reply.reasoning_content
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for i, c in enumerate(reply.tool_calls)
        ]
    prompt_chars = sum(len(str(m.get("content") or "")) for m in body.get("messages", []))
    completion_tokens = max(1, len(reply.content.split()))
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
        "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_chars // 4 + completion_tokens},
    }


class FakeOpenAIServer:
    def __init__(self, responder: Responder, latency_s: float = 0.0,
                 stats: Callable[[], dict[str, Any]] | None = None) -> None:
        self.responder = responder
        self.stats = stats  # served at GET /v1/_stats (for a server in another process)
        self.latency_s = latency_s
        self.requests: list[dict[str, Any]] = []
        # (received, written) monotonic times and body of every 200 the server wrote: what it answered
        self.answered: list[tuple[float, float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
        return self.responder(body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: str, headers: dict[str, str] | None = None) -> None:
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.endswith("/_stats") and fake.stats is not None:
                    self._send(200, json.dumps(fake.stats()))
                    return
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                received = time.monotonic()
                reply = fake._answer(body)
                time.sleep(fake.latency_s if reply.delay_s is None else reply.delay_s)
                if reply.drop:
                    self.close_connection = True
                    return
                if reply.raw_body is not None or reply.status != 200:
                    error = json.dumps({"error": {"message": f"fake error {reply.status}", "type": "fake"}})
                    self._send(reply.status, reply.raw_body if reply.raw_body is not None else error, reply.headers)
                    return
                self._send(200, json.dumps(completion_body(body, reply)), reply.headers)
                with fake._lock:
                    fake.answered.append((received, time.monotonic(), body))

        return Handler


# --- helpers for scripting teachers ---------------------------------------------

def teacher_role(body: dict[str, Any]) -> str:
    """`tool` for the tool teacher's requests (tag stop or python tool), else `reasoning`."""
    if body.get("tools") or "</code>" in (body.get("stop") or []):
        return "tool"
    system = next((m["content"] for m in body.get("messages", []) if m["role"] == "system"), "")
    return "tool" if "code" in system.lower() and "<think>" not in system else "reasoning"


def problem_text(body: dict[str, Any], problems: list[str]) -> str:
    """Which of `problems` this request is about (its last matching user turn)."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user" and message.get("content") in problems:
            return message["content"]
    raise LookupError("request is about none of the scripted problems")


def executor_turns(body: dict[str, Any], problem: str) -> int:
    """How many code outputs the conversation holds after the problem turn (tool teacher)."""
    messages = body.get("messages", [])
    start = max(i for i, m in enumerate(messages) if m.get("role") == "user" and m.get("content") == problem)
    return sum(
        1 for m in messages[start + 1 :]
        if m.get("role") == "tool" or (m.get("role") == "user" and str(m.get("content", "")).startswith("<executor>"))
    )
