"""Distillery: Prefect flows that synthesise distillation data, and the stage code they wire."""

import os

# Measured on 2-core machines: the temporary Prefect server can take ~25 s to come
# up, and its telemetry fails without DNS. Explicit settings still win.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
