"""The GPU check's lean environment (docs/performance.md): torch plus the wheels of
benchmarks/gpu_wheelhouse.sh, without Hugging Face `datasets` or pyarrow.

In a fresh interpreter where both are made unimportable: TorchTitan's trainer imports (compat patch
10 gives its HF text loader placeholders that raise a clear error when called, and `import datasets`
still fails for everyone else); titan_rw's loader imports, and reads token shards. (Where `datasets`
is importable, patch 10 stays off: tests/test_compat.py's list of applied patches.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from helpers import ROOT, subprocess_env  # noqa: E402

BLOCK = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):  # as on a machine where these are not installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("datasets", "pyarrow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def _run(code: str) -> dict:
    env = subprocess_env()
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_torchtitan_and_the_loader_without_datasets_or_pyarrow(tmp_path):
    # token shards of two documents, written by hand in datatrove's layout (uint16 tokens, uint64 ends)
    import numpy as np

    shard = tmp_path / "shard_00000.ds"
    np.array([1, 5, 6, 7, 2, 1, 8, 9, 2], dtype="<u2").tofile(shard)
    np.array([5, 9], dtype="<u8").tofile(str(shard) + ".index")
    r = _run(BLOCK + textwrap.dedent(f"""
        import json, titan_rw
        import torchtitan.trainer, titan_rw.trainer, titan_rw.data.loader
        from torchtitan.hf_datasets import text_datasets as td
        from titan_rw.data.shards import open_shard
        try:
            td.load_dataset("c4")
            called = ""
        except RuntimeError as e:
            called = str(e)
        try:
            import datasets
            still_absent = False
        except ImportError:
            still_absent = True
        part = open_shard({str(shard)!r}, check_tokenizer=False)
        print(json.dumps(dict(
            applied=list(titan_rw.compat.applied_patches()), called=called, still_absent=still_absent,
            stub_class=isinstance(object(), td.Dataset), pyarrow_loaded="pyarrow" in sys.modules,
            tokens=part.tokens.tolist(), ends=part.doc_ends.tolist(),
        )))
    """))
    assert "hf_datasets_absent" in r["applied"]
    assert "needs the Hugging Face `datasets` package" in r["called"] and "patch 10" in r["called"]
    assert r["still_absent"] and r["stub_class"] is False and r["pyarrow_loaded"] is False
    assert r["tokens"] == [1, 5, 6, 7, 2, 1, 8, 9, 2] and r["ends"] == [5, 9]

