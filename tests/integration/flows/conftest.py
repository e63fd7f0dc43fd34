"""A Prefect API for the flow tests: one test harness for the session."""

from __future__ import annotations

from prefect_harness import prefect_home

__all__ = ["prefect_home"]
