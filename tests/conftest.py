"""Shared fixtures: no network, Prefect on a throwaway database, a loopback fake model server."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# what Prefect still keeps in its default result storage (a failed flow run's error), here
# and in the `distillery` processes tests start, not in the developer's ~/.prefect/storage
if "PREFECT_RESULTS_LOCAL_STORAGE_PATH" not in os.environ:
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = _results = tempfile.mkdtemp(prefix="distillery-test-results-")
    atexit.register(shutil.rmtree, _results, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A Prefect server on a temporary SQLite database, shared by the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
