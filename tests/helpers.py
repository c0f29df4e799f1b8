"""What the tests and their worker scripts share: the checkout's root, the environment of a
subprocess that runs this checkout, and a DTensor's full value. Importable by name from every test
(tests/conftest.py puts tests/ on sys.path) and from the workers (run as scripts from tests/)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(inductor_cache=None, *, pythonpath=(), drop=("TORCHELASTIC_RESTART_COUNT",), **extra) -> dict:
    """os.environ for a subprocess that imports this checkout's titan_rw: `pythonpath` entries, then
    ROOT, first on PYTHONPATH; one OpenMP thread (the 2-core machine); torch.compile's cache in
    `inductor_cache`/inductor when given (a private one per test: concurrent tests don't share it);
    the variables in `drop` removed (by default a restart count torchrun would have left, which
    makes a run believe it is a restart); then `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, ROOT, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    if inductor_cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(str(inductor_cache), "inductor")
    env.update(extra)
    return env


def full(t):
    """The whole tensor of a (possibly FSDP-sharded) DTensor; a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def metrics_by_step(folder) -> dict[int, dict]:
    """{step: row} of a run folder's metrics.jsonl (titan_rw.observability.jsonl.read_metrics)."""
    from titan_rw.observability.jsonl import read_metrics

    return {r["step"]: r for r in read_metrics(folder)}


def tmpfs_mount_problem() -> str | None:
    """None when an unprivileged user+mount namespace can mount a small tmpfs here (the full-disk
    tests), else why not."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return "no unshare(1)"
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {r.stderr.strip()[:200]}"


def reweight_as_configured(trainer) -> None:
    """After a worker changed `trainer.rw`'s strategy or cap on a live ReweightTrainer (one trainer,
    several cases): rebuild the ReweightSettings the step uses, which the trainer builds once."""
    from titan_rw.loss import ReweightSettings

    trainer._reweighting = ReweightSettings.of(trainer.rw, trainer.dp_group, trainer.dp_rank, trainer.dp_size)
    trainer._burn_in_settings = trainer._reweighting.uniform()


def distinct_colors(img) -> int:
    """How many distinct RGB colours an image has (an H x W x 3+ array, uint8 or floats in [0, 1]).
    Each pixel's three bytes packed into one integer, then a 1-D unique: the same count as
    `np.unique(pixels, axis=0)`, ~50x faster on a publication-resolution PNG (4 M pixels: ~9 s)."""
    import numpy as np

    rgb = img[..., :3]
    if rgb.dtype != np.uint8:
        rgb = (rgb * 255).astype(np.uint8)
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    return int(np.unique(packed).size)
