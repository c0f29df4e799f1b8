"""The checkpoint room (issue 24): real training processes, real DCP folders, CPU, tiny model.

One uninterrupted reference run (6 steps, a checkpoint every step, keep_latest_k 0) is copied and
its checkpoints edited the way the world edits them; each copy is then resumed with the real
trainer (docs/design.md §6, docs/resuming.md):

- a checkpoint written by an earlier version (today's main: our state pickled, the RNG state a
  pickled tensor and numpy array) resumes bit-exactly; a newer `.metadata` that unpickles to
  something other than DCP's Metadata is skipped (the structural check falls back);
- a crafted payload (our pickle, or DCP's non-tensor value) is refused in one line naming the
  checkpoint, exit 2, and the file the payload would create is not created;
- k + 1 = 3 saves in a row that never finished (data files, no `.metadata`: what a killed save
  leaves) do not count for keep_latest_k = 2: the run resumes from the newest complete checkpoint
  and keeps 2 complete ones;
- a resume with another `--optimizer.lr` runs its first step at the new lr on the loaded schedule
  position, and its row says so (the update is measured against the reference's);
- an async save that fails on a full disk is reported once, naming its own step and the newest
  complete checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch


from helpers import ROOT, subprocess_env, tmpfs_mount_problem  # noqa: E402
pytestmark = pytest.mark.slow

STEPS, WARMUP, LR, MIN_LR = 6, 2, 1e-3, 0.1  # debug_cpu.toml: lr 1e-3, cosine decay to 0.1 x lr
COMMON = [
    "--config", "train_configs/debug_cpu.toml", "--model.flavor", "tiny", "--training.steps", str(STEPS),
    "--training.seq_len", "32", "--training.local_batch_size", "8", "--training.global_batch_size", "16",
    "--logging.log_interval", "1", "--reweight.warmup_steps", "2", "--lr_scheduler.warmup_steps", str(WARMUP),
    "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "0", "--metrics.enable_tensorboard", "false",
    "--job.deterministic", "true",
]
STREAM_KEY = "titan_rw_token_stream"  # the data loader's key (titan_rw/data/loader.py)


def _run(tmp, folder, *extra, expect=0, timeout=300):
    cmd = [sys.executable, "-m", "titan_rw.train", *COMMON, "--job.dump_folder", folder, *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(tmp), capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == expect, f"exit {out.returncode} (expected {expect})\n" + log[-6000:]
    return log


def _rows(folder) -> dict[int, dict]:
    rows = {}
    with open(os.path.join(folder, "metrics.jsonl")) as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                rows[r["step"]] = r  # a redone step's last row
    return rows


def _ck(folder, step) -> str:
    return os.path.join(folder, "checkpoint", f"step-{step}")


def _complete(folder) -> list[int]:
    d = os.path.join(folder, "checkpoint")
    return sorted(int(n.split("-")[1]) for n in os.listdir(d) if os.path.isfile(os.path.join(d, n, ".metadata")))


def _folders(folder) -> list[int]:
    return sorted(int(n.split("-")[1]) for n in os.listdir(os.path.join(folder, "checkpoint")))


def _copy(src, dst, steps):
    """The reference run's folder with only these checkpoints."""
    shutil.copytree(src, dst)
    for s in _folders(dst):
        if s not in steps:
            shutil.rmtree(_ck(dst, s))


def _one_line(log, needle):
    lines = [ln for ln in log.splitlines() if needle in ln]
    assert len(lines) == 1, (needle, log[-4000:])
    return lines[0]


def _read(path) -> dict:
    """A whole DCP checkpoint as a nested dict (our own test files: plain torch.load is fine here)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.rstrip("/") + ".pt"
    dcp_to_torch_save(path, out)
    sd = torch.load(out, weights_only=False)
    os.remove(out)
    return sd


def _rewrite(path, sd):
    """Replace checkpoint `path` by the DCP checkpoint of `sd` (one process, no process group)."""
    import torch.distributed.checkpoint as dcp

    shutil.rmtree(path)
    dcp.save(sd, checkpoint_id=path, no_dist=True)


def _state(value):
    """Our saved state as plain data: a JSON tensor (this version) or main's pickle (our own test
    files, so plain pickle.loads is fine here)."""
    if isinstance(value, torch.Tensor):
        return json.loads(value.numpy().tobytes())
    return pickle.loads(value)


def _to_old_format(path):
    """Checkpoint `path` as today's main wrote it: the trainer's extra state and the data loader's
    stream state as `pickle.dumps` bytes, the RNG states as main's rng_state() returned them (a
    torch tensor, np.random.get_state()'s tuple with its uint32 array, random.getstate())."""
    sd = _read(path)
    extra = _state(sd["train_state"]["titan_rw"])
    rng = extra["rng"]
    kind, key, pos, has_gauss, gauss = rng["numpy"]
    version, internal, gauss_next = rng["python"]
    import base64

    t = rng["torch"]
    t = t if isinstance(t, torch.Tensor) else torch.frombuffer(bytearray(base64.b64decode(t)), dtype=torch.uint8).clone()
    extra["rng"] = {"torch": t,
                    "numpy": (kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss),
                    "python": (version, tuple(internal), gauss_next)}
    extra["run_logger"]["window"] = [tuple(x) for x in extra["run_logger"]["window"]]
    extra["version"] = 1
    sd["train_state"]["titan_rw"] = pickle.dumps(extra)
    stream = _state(sd["dataloader"][STREAM_KEY])
    sd["dataloader"][STREAM_KEY] = pickle.dumps(stream)
    _rewrite(path, sd)


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _kinds(path) -> dict[str, str]:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(path).read_metadata()
    return {k: type(md.state_dict_metadata[k]).__name__ for k in ("train_state.titan_rw", f"dataloader.{STREAM_KEY}")}


def _lr_at(step, base):
    """TorchTitan's warmup-stable-decay schedule (cosine, min_lr_factor), written out: step s runs
    at the factor of scheduler position s - 1; one stable step after the warm-up."""
    c = step - 1
    if c < WARMUP:
        return base * (c + 1) / WARMUP
    if c < WARMUP + 1:
        return base
    progress = (c - WARMUP) / (STEPS - WARMUP)
    return base * (MIN_LR + (1 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("trust"))
    folder = os.path.join(base, "ref")
    _run(base, folder)
    return {"base": base, "folder": folder, "rows": _rows(folder)}


def test_a_checkpoint_of_the_earlier_format_resumes_bit_exactly(ref):
    """step-2 rewritten in main's pickle format; step-3's .metadata unpickles to an object that
    is not DCP's Metadata: the resume skips step-3 in one line, loads step-2 and redoes 3-6 bit for bit."""
    base, folder = ref["base"], os.path.join(ref["base"], "old")
    _copy(ref["folder"], folder, {1, 2, 3})
    _to_old_format(_ck(folder, 2))
    assert _kinds(_ck(folder, 2)) == {"train_state.titan_rw": "BytesStorageMetadata",
                                      f"dataloader.{STREAM_KEY}": "BytesStorageMetadata"}
    with open(os.path.join(_ck(folder, 3), ".metadata"), "wb") as fh:
        pickle.dump(types.SimpleNamespace(note="not DCP's Metadata"), fh)
    log = _run(base, folder)
    line = _one_line(log, "titan_rw checkpoint: skipped")
    assert "step-3: .metadata holds a SimpleNamespace, not DCP's Metadata" in line
    assert line.rstrip().endswith(f"loaded {_ck(folder, 2)}")
    rows = _rows(folder)
    for s in range(3, STEPS + 1):
        for k in ("loss", "weighted_loss", "max_weight", "grad_norm", "lr"):
            assert rows[s][k] == ref["rows"][s][k], (s, k, rows[s][k], ref["rows"][s][k])
    # what this version writes: JSON tensors, no pickle of ours
    assert _kinds(_ck(folder, STEPS)) == {"train_state.titan_rw": "TensorStorageMetadata",
                                          f"dataloader.{STREAM_KEY}": "TensorStorageMetadata"}


@pytest.mark.parametrize("where", ["our pickle", "dcp value"])
def test_a_crafted_payload_is_refused_and_nothing_runs(ref, where):
    """`our pickle`: main's format, with the payload inside the pickled train state (read by our
    unpickler); `dcp value`: the payload as DCP's own non-tensor value (torch.save'd by DCP, read
    by DCP's load planner). Either way: exit 2, one line naming the checkpoint, no file created."""
    base = ref["base"]
    folder = os.path.join(base, "crafted_" + where.replace(" ", "_"))
    marker = os.path.join(base, f"pwned_{where.replace(' ', '_')}")
    _copy(ref["folder"], folder, {2})
    path = _ck(folder, 2)
    sd = _read(path)
    if where == "our pickle":
        extra = _state(sd["train_state"]["titan_rw"])
        extra["run_logger"]["window"] = [_Payload(marker)]
        sd["train_state"]["titan_rw"] = pickle.dumps(extra)
    else:
        sd["dataloader"][STREAM_KEY] = _Payload(marker)
    _rewrite(path, sd)
    assert not os.path.exists(marker)
    log = _run(base, folder, expect=2)
    assert not os.path.exists(marker), "the crafted checkpoint ran its payload"
    line = _one_line(log, "refusing to load")
    assert f"refusing to load {path}:" in line and "io.open" in line and "nothing from it was run" in line
    assert "Traceback" not in log


def test_keep_latest_k_counts_complete_checkpoints_only(ref):
    """keep_latest_k 2; step-4, step-5 and step-6 are saves that never finished (k + 1 in a row,
    their .metadata gone) and step-2 an older one. The resume loads step-3 (the newest complete),
    redoes step 4 bit-exactly, and after its last save keeps step-3 and step-4 (complete), drops
    step-1 and the unfinished step-2, and leaves the unfinished 5 and 6 to be redone."""
    base, folder = ref["base"], os.path.join(ref["base"], "partial")
    _copy(ref["folder"], folder, {1, 2, 3, 4, 5, 6})
    for s in (2, 4, 5, 6):
        os.remove(os.path.join(_ck(folder, s), ".metadata"))
    log = _run(base, folder, "--checkpoint.keep_latest_k", "2", "--training.steps", "4",
               "--lr_scheduler.total_steps", str(STEPS))
    assert _one_line(log, "titan_rw checkpoint: skipped").rstrip().endswith(f"loaded {_ck(folder, 3)}")
    assert _rows(folder)[4]["loss"] == ref["rows"][4]["loss"]
    assert _complete(folder) == [3, 4]
    assert _folders(folder) == [3, 4, 5, 6]


def test_a_changed_lr_acts_from_the_first_resumed_step_and_the_row_says_so(ref):
    """Resumed from step-4 with --optimizer.lr 1e-2: step 5's row shows 1e-2 on the schedule
    (written out in _lr_at), and step 5's update (step-5 minus step-4 weights) is the reference's
    scaled by exactly that lr ratio (AdamW's update is linear in the lr, the moments are the same)."""
    base, folder = ref["base"], os.path.join(ref["base"], "lr")
    _copy(ref["folder"], folder, {4})
    log = _run(base, folder, "--optimizer.lr", "1e-2", "--training.steps", "5", "--lr_scheduler.total_steps", str(STEPS))
    rows, old = _rows(folder), ref["rows"]
    for s in (1, 2, 3, 4, 5, 6):
        assert old[s]["lr"] == pytest.approx(_lr_at(s, LR), rel=1e-12), s
    assert rows[5]["lr"] == pytest.approx(_lr_at(5, 1e-2), rel=1e-12)
    assert rows[5]["loss"] == old[5]["loss"]  # the same weights went into step 5
    p4, new5, old5 = (_read(p) for p in (_ck(folder, 4), _ck(folder, 5), _ck(ref["folder"], 5)))
    num = den = 0.0
    for k, w in p4.items():
        if isinstance(w, torch.Tensor) and w.is_floating_point() and k in new5 and "." in k and w.dim() >= 1:
            d_new, d_old = (new5[k].double() - w.double()), (old5[k].double() - w.double())
            num += float((d_new * d_old).sum())
            den += float((d_old * d_old).sum())
    assert den > 0
    assert num / den == pytest.approx(rows[5]["lr"] / old[5]["lr"], rel=1e-3)
    assert "optimizer.lr was 0.001, is now 0.01" in _one_line(log, "titan_rw resume: changed since")


def test_a_failed_async_save_names_its_step_and_the_newest_complete_one(tmp_path):
    """async_mode = "async", the checkpoint folder on a 7 MiB tmpfs (a tiny checkpoint is ~4.9 MB):
    step-2 is written, step-4's background write runs out of space and is found when step 6 waits
    for it. One line, exit 1: step 4 failed, step-2 is the newest complete checkpoint."""
    why = tmpfs_mount_problem()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the async full-disk test must run in CI: {why}")
        pytest.skip(f"async full-disk test needs a small file system: {why}")
    folder = tmp_path / "run"
    (folder / "checkpoint").mkdir(parents=True)
    args = " ".join([*COMMON, "--checkpoint.interval", "2", "--checkpoint.async_mode", "async"])
    script = f"""
set -u
mount -t tmpfs -o size=7m tmpfs {folder}/checkpoint
{sys.executable} -m titan_rw.train {args} --job.dump_folder {folder} > {tmp_path}/full.log 2>&1; echo $? > {tmp_path}/full.rc
ls -a {folder}/checkpoint/step-2 > {tmp_path}/step2.txt 2>&1
"""
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                   env=subprocess_env(str(tmp_path)), timeout=600, check=True)
    full = (tmp_path / "full.log").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "1", full[-4000:]
    line = _one_line(full, "no space left on device")
    assert f"while saving step 4 to {folder}/checkpoint/step-4 " in line, line
    assert f"the newest complete checkpoint is {folder}/checkpoint/step-2." in line, line
    assert line.count("no space left on device") == 1, line
    assert "Traceback" not in full
    assert ".metadata" in (tmp_path / "step2.txt").read_text().split()
