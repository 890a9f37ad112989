"""A moto S3 server on 127.0.0.1 for the object-store tests; the AWS_* variables point at it
(and reach the worker processes a flow starts)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator:
    """An s3fs filesystem on a fresh moto server holding one empty `bucket`."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
                env.setenv(name, value)
            s3fs.S3FileSystem.clear_instance_cache()  # instances keep the endpoint they were made with
            fs = fsspec.filesystem("s3")
            fs.mkdir(bucket)
            yield fs
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


def fresh_machines(tmp_path, monkeypatch):
    """`fresh()` makes this process work as a new machine would: an empty output mirror
    folder (returned) and no memo of what was synced. Called once before it is returned."""
    import schemas.recipe
    from flows.publishing import storage

    machines = iter(range(100))

    def fresh():
        folder = tmp_path / f"machine-{next(machines)}"
        monkeypatch.setattr(schemas.recipe, "OUTPUT_MIRRORS", folder)
        monkeypatch.setattr(storage, "_in_sync", {})  # the process memo of that machine
        return folder

    fresh()
    return fresh
