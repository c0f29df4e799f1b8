"""`launch/setup.sh` and the torch range (issue 21 §1, §2; the range is pyproject.toml's).

- `launch/torch_range.py` reads the range from pyproject.toml and judges versions by their release
  numbers (checked against hand-written cases, not against itself).
- A venv holding a torch outside the range (a stub distribution: a `torch` package and its
  dist-info, version 2.99.0, then 2.10.0): setup exits 1 with one line naming the version, the venv
  and the range, before pip runs: `pip freeze` and every file of the venv are unchanged.
  (That it keeps a real torch inside the range: tests/test_torch211.py, on torch 2.11.0.)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from helpers import ROOT  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "launch"))

from torch_range import declared, inside  # noqa: E402


def test_the_range_is_pyprojects_and_versions_compare_by_release():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    assert [d for d in deps if d.startswith("torch") and not d.startswith("torchtitan")] == [f"torch{declared()}"]
    assert declared() == ">=2.11.0,<2.16"
    for v in ("2.11.0", "2.12.1", "2.13.0+cpu", "2.14.1", "2.15.0", "2.15.0+cu130", "2.15.2rc1"):
        assert inside(v), v
    for v in ("2.10.0", "2.10.9+cu128", "2.16.0", "2.16.0.dev20260301", "3.0.0", "1.13.1", "", "nightly"):
        assert not inside(v), v
    assert inside("2.13", ">=2.13.0,<2.14") and not inside("2.14", ">=2.13.0,<2.14")


def _stub_torch(site: str, version: str) -> None:
    """A `torch` that pip and importlib.metadata see as installed at `version` (import prints it)."""
    for name in os.listdir(site):
        if name.startswith("torch-") and name.endswith(".dist-info"):
            for f in os.listdir(os.path.join(site, name)):
                os.remove(os.path.join(site, name, f))
            os.rmdir(os.path.join(site, name))
    os.makedirs(os.path.join(site, "torch"), exist_ok=True)
    with open(os.path.join(site, "torch", "__init__.py"), "w") as fh:
        fh.write(f'__version__ = "{version}"\n')
    info = os.path.join(site, f"torch-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as fh:
        fh.write(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    with open(os.path.join(info, "INSTALLER"), "w") as fh:
        fh.write("pip\n")
    with open(os.path.join(info, "RECORD"), "w") as fh:
        fh.write(f"torch/__init__.py,,\ntorch-{version}.dist-info/METADATA,,\n")


def _snapshot(venv: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(venv):
        for f in files:
            p = os.path.join(d, f)
            if "__pycache__" in p:
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, venv)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _freeze(py: str) -> str:
    p = subprocess.run([py, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("version", ["2.99.0", "2.10.0"])
def test_setup_refuses_a_torch_outside_the_range_and_changes_nothing(tmp_path, version):
    venv = str(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    py = os.path.join(venv, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    _stub_torch(site, version)
    freeze, files = _freeze(py), _snapshot(venv)
    assert f"torch=={version}" in freeze.splitlines()  # pip sees the stub as the installed torch
    p = subprocess.run(["bash", "launch/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "VENV": venv})
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1, (p.returncode, p.stdout + p.stderr)
    line = lines[0]
    assert line.startswith("[setup] torch ") and f"torch {version} in {venv}" in line, line
    assert "torch>=2.11.0,<2.16" in line and "pyproject.toml" in line and "nothing was changed" in line, line
    assert _freeze(py) == freeze
    assert _snapshot(venv) == files
