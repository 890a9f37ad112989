"""The content keys and fingerprints (flows/models/keys.py) keep their values: journals, cached
stage results and trained students on users' disks are found by them."""

from __future__ import annotations

import hashlib
import json

from flows.models import journal
from flows.models.keys import content_key, fingerprint, request_key
from schemas.recipe import TrainerSpec


def test_request_keys_keep_their_values():
    chat = {"model": "m", "messages": [{"role": "user", "content": "héllo"}],
            "params": {"seed": 1, "temperature": 0.7}}
    assert request_key("chat", chat) == "acb9e6d2e1c3f598c52cfc64b595086fcef858b8342da2322aa8329ee711f2b6"
    assert request_key("exec", {"code": "print(1)", "limits": {"wall_time_s": 5}}) == (
        "484cc0f1f4cad3e35166fc5d2f880d982807c0c8495264c9846fcbcb2d3a28a6")
    assert journal.request_key is request_key  # the journal's key is this one


def test_content_keys_keep_their_values():
    key = content_key("shard", 3, {"b": 1, "a": [1, 2]}, ["x", ("y", 2)], None, TrainerSpec(kind="hf"))
    assert key == "0ecb3633f3399e793424f6b3f9d48cf9"


def test_fingerprints_keep_their_values():
    # a student's scope: parts in a tuple, a pydantic model written as its str
    assert fingerprint(("student", TrainerSpec(kind="hf"), [1, 2], None, {"b": 2, "a": 1})) == "ff288c82cb03bec1"
    # a teacher's fingerprint: a JSON-ready dict, hashed as sorted JSON
    parts = {"role": "tool", "model": "m", "sampling": {"temperature": 0.7, "seed": 0}, "limits": {"wall_time_s": 5.0}}
    assert fingerprint(parts) == "021c9f308133a05f"
    assert fingerprint(parts) == hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
