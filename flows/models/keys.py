"""Every content key and fingerprint of the project, in one place: hashes of what decides a
result, never of where it came from (no URL, no credentials).

- `request_key`: a model request or a code execution, as the request journal stores it
  (full SHA-256 of canonical JSON).
- `content_key`: the content address of a stage's inputs, the Prefect cache key of a stage
  task (32 hex digits; pydantic models are hashed as their JSON, lists part by part).
- `fingerprint`: a short hash (16 hex digits) of a JSON-ready value: what decides a
  teacher's or a student's answers, a part of cache keys.

The values are on disk (journals, cached stage results, trained students' markers): a
change to any of these functions makes every user's finished work unreachable.
tests/test_keys.py pins them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def request_key(kind: str, payload: dict[str, Any]) -> str:
    """Stable hash of a request's content (`kind` separates model calls from executions)."""
    canonical = json.dumps({"kind": kind, **payload}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def content_key(*parts: object) -> str:
    """Content address of a stage's inputs (pydantic models are dumped to JSON)."""
    digest = hashlib.sha256()
    for part in parts:
        if hasattr(part, "model_dump_json"):
            digest.update(part.model_dump_json().encode())
        elif isinstance(part, (list, tuple)):
            digest.update(content_key(*part).encode())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:32]


def fingerprint(value: object) -> str:
    """16 hex digits of `value` as sorted JSON (anything JSON cannot write is written as `str`)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
