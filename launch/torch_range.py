"""The torch range titan_rw supports, read from `pyproject.toml` (the one place it is declared),
and the torch an environment holds, read from its installed distribution (torch is not imported,
so a broken or foreign build is judged by its version alone).

    VENV/bin/python launch/torch_range.py VENV
        exit 0: prints the torch version present, inside the range
        exit 1: one line on stderr, a torch outside the range
        exit 3: no torch distribution in this environment

Used by `launch/setup.sh` (with the target environment's python) and `benchmarks/gpu_check.sh`
(`declared()` and `inside()`). Versions compare by their release numbers: `2.15.0+cu130` and
`2.15.0rc1` are 2.15.0; `2.16.0.dev...` is outside `<2.16`.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OPS = {">=": lambda c: c >= 0, "<=": lambda c: c <= 0, ">": lambda c: c > 0, "<": lambda c: c < 0,
        "==": lambda c: c == 0, "!=": lambda c: c != 0}


def declared(root: str = ROOT) -> str:
    """The torch requirement of pyproject.toml without its name, e.g. ">=2.11.0,<2.16"."""
    with open(os.path.join(root, "pyproject.toml")) as fh:
        m = re.search(r'^\s*"torch\s*([<>=!][^";]*)"', fh.read(), re.M)
    if m is None:
        raise SystemExit(f"launch/torch_range.py: no \"torch...\" requirement in {root}/pyproject.toml")
    return m.group(1).replace(" ", "")


def _release(version: str) -> tuple[int, ...]:
    m = re.match(r"\d+(?:\.\d+)*", version.strip())
    if m is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(x) for x in m.group(0).split("."))


def _compare(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def inside(version: str, spec: str | None = None) -> bool:
    """`version` (e.g. "2.13.0+cpu") satisfies every clause of `spec` (default: `declared()`)."""
    try:
        have = _release(version)
    except ValueError:
        return False
    for clause in (spec or declared()).split(","):
        op, want = re.match(r"(>=|<=|==|!=|<|>)(.+)", clause).groups()
        if not _OPS[op](_compare(have, _release(want))):
            return False
    return True


def main(argv: list[str]) -> int:
    where = argv[1] if len(argv) > 1 else sys.prefix
    spec = declared()
    try:
        have = md.version("torch")
    except md.PackageNotFoundError:
        return 3
    if not inside(have, spec):
        print(f"[setup] torch {have} in {where} is outside the range titan_rw supports (torch{spec}, "
              "pyproject.toml); nothing was changed: install a torch in that range there, or set VENV to a "
              "new folder (setup then installs torch 2.13.0)", file=sys.stderr)
        return 1
    print(have)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
