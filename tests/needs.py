"""Tests that need Slurm, shellcheck or network namespaces: skip with the reason on a machine
without them (`make test` on a laptop), fail instead where CI asks for them, so CI can never pass
by skipping: TITAN_RW_REQUIRE_SLURM=1 (CI's .ci/run starts Slurm and installs shellcheck) and
TITAN_RW_REQUIRE_NETNS=1 or CI=true (root with iproute2: tests/test_two_hosts.py)."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE = os.environ.get("TITAN_RW_REQUIRE_SLURM") == "1"
REQUIRE_NETNS = os.environ.get("TITAN_RW_REQUIRE_NETNS") == "1" or os.environ.get("CI") == "true"


def skip_or_fail(why: str) -> None:
    if REQUIRE:
        pytest.fail(f"TITAN_RW_REQUIRE_SLURM=1 but {why}")
    pytest.skip(why)


def need_tool(name: str, why: str) -> None:
    """Skip (fail under TITAN_RW_REQUIRE_SLURM=1) when the executable `name` is not on PATH."""
    if not shutil.which(name):
        skip_or_fail(f"{name} not found on PATH: {why}")


def skip_or_fail_netns(why: str) -> None:
    """Network namespaces are not available here: skip, or fail under TITAN_RW_REQUIRE_NETNS=1 / CI=true."""
    if REQUIRE_NETNS:
        pytest.fail(f"TITAN_RW_REQUIRE_NETNS=1 (or CI=true) but {why}", pytrace=False)
    pytest.skip(why)
