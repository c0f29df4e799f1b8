"""Tests that need Slurm or shellcheck: skip with the reason on a machine without them (`make test`
on a laptop), fail instead under TITAN_RW_REQUIRE_SLURM=1 (CI's .ci/run starts Slurm and installs
shellcheck), so CI can never pass by skipping."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE = os.environ.get("TITAN_RW_REQUIRE_SLURM") == "1"


def skip_or_fail(why: str) -> None:
    if REQUIRE:
        pytest.fail(f"TITAN_RW_REQUIRE_SLURM=1 but {why}")
    pytest.skip(why)


def need_tool(name: str, why: str) -> None:
    """Skip (fail under TITAN_RW_REQUIRE_SLURM=1) when the executable `name` is not on PATH."""
    if not shutil.which(name):
        skip_or_fail(f"{name} not found on PATH: {why}")
