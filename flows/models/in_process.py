"""The part every in-process backend shares: a `ModelClient` whose model lives in this
process instead of behind an HTTP endpoint.

`chat()` (journal keys, budget-aware replay, stats) is inherited unchanged. The model is
loaded in a worker thread on the first request the journal cannot answer (`_load`), so a
fully replayed rerun never loads it; `per_loop` keeps one helper (a lock, a batcher) per
event loop, since Prefect may run tasks on several.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flows.models.client import ModelClient, ModelRequestError
from flows.models.journal import RequestJournal

Helper = TypeVar("Helper")


@dataclass(init=False, eq=False)
class InProcessClient(ModelClient):
    """`checkpoint`: what `_load` reads; `base_url` defaults to `{scheme}:{checkpoint}` (shown
    in errors; never contacted)."""

    checkpoint: str = ""

    def __init__(self, model: str, checkpoint: str | Path, journal: RequestJournal, *, scheme: str,
                 **fields: Any) -> None:
        fields.setdefault("base_url", f"{scheme}:{checkpoint}")
        super().__init__(model=model, journal=journal, **fields)
        self.checkpoint = str(checkpoint)
        self.scheme = scheme
        self._model: Any = None
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def _load(self) -> Any:
        """Load the model (blocking; runs in a worker thread)."""
        raise NotImplementedError

    async def _connect(self) -> Any:  # type: ignore[override]
        if self._model is None:
            self._model = await asyncio.to_thread(self._load)
        return self._model

    def refuse_tools(self, tools: list[dict[str, Any]] | None) -> None:
        """In-process backends render the chat template themselves: no function calling."""
        if tools:
            raise ModelRequestError(
                self.endpoint, self.model,
                f"function calling (tools) is not supported by the {self.scheme} backend; use the tags protocol",
            )

    def per_loop(self, make: Callable[[], Helper]) -> Helper:
        """This event loop's helper, made on first use."""
        loop = asyncio.get_running_loop()
        helper = self._per_loop.get(loop)
        if helper is None:
            helper = self._per_loop[loop] = make()
        return helper
