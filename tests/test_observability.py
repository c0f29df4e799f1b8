"""RunLogger: metrics.jsonl, samples.jsonl and TensorBoard event files of short real runs of the
real trainer, read back and checked against an independent recomputation.

The runs (module fixture, shared by every test below): `python -m titan_rw.train` (through
tests/obs_worker.py, which also saves each group's gathered per-sample losses and rank 0's
provenance) with the debug model on the shipped corpus:

- "one": 1 rank, scope microbatch, k = 2 groups of 8, an inf injected in one sample's embedding
  output at step 2 (groups of 7 and 8 valid samples);
- "two": 2 ranks, scope microbatch, k = 2 groups of 8 (4 per rank);
- "global": 1 rank, scope global_batch, k = 2 micro-batches, one group of 16.

Every expected value (weights, per-group b and bound, violations, per-domain mean weight and mass,
histogram sums, the samples tables) is recomputed here from the logged losses with the paper's
formula (min-max normalize -> strategy -> softmax with temperature), in float64.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from obs_helpers import corpus_ids, event_dirs
from titan_rw.loss import ReweightSettings, reweighted_loss
from titan_rw.observability.jsonl import read_metrics, read_samples
from titan_rw.observability.names import HIST_TAGS, SCALAR_TAGS
from titan_rw.observability.provenance import GroupLayout
from titan_rw.observability.run_logger import RunLogger
from titan_rw.observability.tensorboard_sink import tb_writer_of
from titan_rw.progress import Progress, fmt_duration

from helpers import ROOT, subprocess_env  # noqa: E402
STEPS = 4
GLOBAL_BATCH = 16
RUNS = {  # name: (ranks, local batch, scope, strategy, temperature, extra overrides)
    "one": (1, 8, "microbatch", "linupper", 0.2, ["--fault_injection.nan_loss_steps", "[2]"]),
    "two": (2, 4, "microbatch", "linupper", 0.2, []),
    "global": (1, 8, "global_batch", "quadratic", 0.3, []),
}


def _launch(name, base, env):
    ranks, local, scope, strategy, r, extra = RUNS[name]
    folder = os.path.join(base, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           os.path.join(ROOT, "tests", "obs_worker.py"), folder + ".json",
           "--config", "train_configs/debug_cpu.toml", "--job.dump_folder", folder,
           "--training.steps", str(STEPS), "--training.seq_len", "64",
           "--training.local_batch_size", str(local), "--training.global_batch_size", str(GLOBAL_BATCH),
           "--reweight.strategy", strategy, "--reweight.temperature", str(r), "--reweight.warmup_steps", "0",
           "--reweight.scope", scope, "--logging.log_interval", "2", "--logging.histogram_interval", "2",
           "--logging.samples_interval", "2", "--logging.top_k", "3",
           "--lr_scheduler.warmup_steps", "1", "--checkpoint.enable", "false", *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    with open(folder + ".json") as fh:
        captured = {int(k): v for k, v in json.load(fh).items()}
    return {"dir": folder, "cap": captured, "log": out.stdout + out.stderr}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("obs_trainer"))
    env = subprocess_env(base)
    return {name: _launch(name, base, env) for name in RUNS}


def _acc(run_dir):
    dirs = event_dirs(run_dir)
    assert len(dirs) == 1, dirs
    ea = EventAccumulator(dirs[0], size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def _stats(losses, strategy="linupper", temperature=1.0, cap=None, valid=None):
    return reweighted_loss(
        torch.as_tensor(losses, dtype=torch.float32), temperature, ReweightSettings(strategy, cap=cap), valid=valid,
    )[1]


# ---------------------------------------------------------------------------- the reference
def reference_weights(losses, valid, strategy, r):
    """The paper's weights of one group, float64: h = 2 (f - f_min) / (f_max - f_min) - 1 over the
    valid finite losses (0 when the range is ~0), s = strategy(h) (DRO-KL: s = f), w = softmax(s / r);
    invalid samples 0."""
    f = np.asarray(losses, dtype=np.float64)
    ok = np.asarray(valid, dtype=bool) & np.isfinite(f)
    w = np.zeros_like(f)
    if not ok.any():
        return w
    fv = f[ok]
    span = fv.max() - fv.min()
    h = np.zeros_like(fv) if span <= 1e-6 else 2 * (fv - fv.min()) / span - 1
    s = {"uniform": 0 * h, "linupper": np.minimum(h + 1, 1), "quadratic": 1 - h * h,
         "extremes": np.abs(h), "dro_kl": fv}[strategy]
    z = s / r
    e = np.exp(z - z.max())
    w[ok] = e / e.sum()
    return w


class Expected:
    """One step of a run, recomputed from its captured per-sample losses and provenance."""

    def __init__(self, run, step):
        ranks, local, scope, strategy, r, _ = RUNS[run["name"]]
        cap = run["cap"][step]
        self.groups = [(np.asarray(g["losses"], np.float64), np.asarray(g["valid"], bool)) for g in cap["groups"]]
        self.w = [reference_weights(f, v, strategy, r) for f, v in self.groups]
        self.b = [int((v & np.isfinite(f)).sum()) for f, v in self.groups]
        self.max_w = [float(w.max()) for w in self.w]
        self.ratio = [m * b / 2 for m, b in zip(self.max_w, self.b)]  # each group against its own 2/b
        top = int(np.argmax(self.max_w))
        self.row = {
            "max_weight": max(self.max_w), "b": self.b[top], "max_weight_bound": 2 / self.b[top],
            "bound_ratio": max(self.ratio),
            "ess": float(np.mean([1 / (w * w).sum() for w in self.w])),
            "loss": float(np.mean([f[v & np.isfinite(f)].mean() for f, v in self.groups])),
            "weighted_loss": float(np.mean([(w * np.where(w > 0, f, 0)).sum() for (f, _), w in zip(self.groups, self.w)])),
        }
        self.violations = sum(x > 1 + 1e-6 for x in self.ratio)
        self.ambiguous = any(abs(x - 1) < 1e-3 for x in self.ratio)
        # rank 0's provenance rows: micro-batch j, row i -> (group, position in the group)
        k = GLOBAL_BATCH // (local * ranks)
        self.where = []
        for n in range(len(cap["prov"])):
            j, i = divmod(n, local)
            self.where.append((j, i) if scope == "microbatch" else (0, j * local * ranks + i))
        assert len(self.groups) == (k if scope == "microbatch" else 1)
        self.prov = cap["prov"]

    def bw(self, n):
        """b·w of provenance row n, b of its own group."""
        g, i = self.where[n]
        return self.w[g][i] * self.b[g]

    def row_valid(self, n):
        g, i = self.where[n]
        f, v = self.groups[g]
        return bool(v[i] and np.isfinite(f[i]))

    def domains(self):
        share, mass, rows, total = {}, {}, 0, 0.0
        for n, docs in enumerate(self.prov):
            if not docs or not self.row_valid(n):
                continue
            rows += 1
            tok = sum(max(d.get("n_tokens") or 1, 0) for d in docs) or len(docs)
            total += self.bw(n)
            for d in docs:
                frac = max(d.get("n_tokens") or 1, 0) / tok
                dom = str(d.get("domain") or "unknown")
                share[dom] = share.get(dom, 0.0) + frac
                mass[dom] = mass.get(dom, 0.0) + frac * self.bw(n)
        return {dom: {"share": share[dom] / rows, "mean_weight": mass[dom] / share[dom],
                      "weight_mass": mass[dom] / total} for dom in share}


def _expected(runs, name, step):
    return Expected(dict(runs[name], name=name), step)


# ---------------------------------------------------------------------------- the real trainer
@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_metrics_rows_match_the_reference(runs, name):
    rows = read_metrics(runs[name]["dir"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    k = 2 if RUNS[name][2] == "microbatch" else 1
    violations_total = 0
    for r in rows:
        ex = _expected(runs, name, r["step"])
        assert r["groups"] == k
        for key, want in ex.row.items():
            assert r[key] == pytest.approx(want, rel=2e-4, abs=1e-6), (name, r["step"], key)
        if not ex.ambiguous:
            # a version comparing every group with the largest group's bound, or the step's max
            # weight with one bound, counts differently whenever the groups' b or weights differ
            assert r["bound_violations"] == ex.violations, (name, r["step"], ex.ratio)
        violations_total += r["bound_violations"]
        assert r["bound_violations_total"] == violations_total
        got, want = r["domains"], ex.domains()
        assert set(got) == set(want), (name, r["step"])
        for dom in want:
            for key in ("share", "mean_weight", "weight_mass"):
                # with k groups each summing to 1, b·w with b = the whole step's samples is k
                # times too large (uniform weights would show mean weight 2.0 instead of 1.0)
                assert got[dom][key] == pytest.approx(want[dom][key], rel=2e-4), (name, r["step"], dom, key)


@pytest.mark.slow
def test_runs_exercise_what_the_checks_are_about(runs):
    """The comparisons above can only catch the per-group defects if the runs have unequal groups
    and steps where some, not all, groups break their bound."""
    ex = {(n, s): _expected(runs, n, s) for n in RUNS for s in range(1, STEPS + 1)}
    assert any(len(set(e.b)) > 1 for e in ex.values())  # step 2 of "one": b = 7 and 8
    assert any(0 < e.violations < len(e.groups) for e in ex.values())
    assert any(e.violations == 0 for e in ex.values())
    spread = [max(d["mean_weight"] for d in e.domains().values()) - min(d["mean_weight"] for d in e.domains().values())
              for e in ex.values()]
    assert max(spread) > 0.05  # reweighting really moves the domains' mean weight


@pytest.mark.slow
def test_nonfinite_activation_drops_the_step(runs):
    """fault_injection.nan_loss_steps puts +inf in sample 0's embedding output at step 2 (rank 0, first
    micro-batch): its loss is NaN, it gets weight 0 and leaves b, and the whole step is dropped."""
    run = runs["one"]
    f0 = run["cap"][2]["groups"][0]["losses"]
    assert math.isnan(f0[0]) and all(math.isfinite(x) for x in f0[1:])
    assert all(math.isfinite(x) for s in run["cap"] for g in run["cap"][s]["groups"] for x in g["losses"]
               if (s, g) != (2, run["cap"][2]["groups"][0]))
    m = {r["step"]: r for r in read_metrics(run["dir"])}
    assert [m[s]["nonfinite_samples"] for s in m] == [0, 1, 0, 0]
    # the non-finite value started inside the model: it reached the weights' gradients (a NaN set
    # only after the loss, as the knob once did, leaves the gradient norm finite)
    assert math.isnan(m[2]["grad_norm"]) and all(math.isfinite(m[s]["grad_norm"]) for s in (1, 3, 4))
    assert [m[s]["skipped"] for s in m] == [0, 1, 0, 0] and [m[s]["skipped_steps"] for s in m] == [0, 1, 1, 1]
    assert "step 2: 1 sample(s) with a non-finite loss; optimizer step skipped" in run["log"]
    for key in ("loss", "weighted_loss", "max_weight", "ess"):
        assert math.isfinite(m[2][key])


@pytest.mark.slow
def test_tensorboard_scalars_and_histograms_match_the_reference(runs):
    for name in RUNS:
        rows = {r["step"]: r for r in read_metrics(runs[name]["dir"])}
        ea = _acc(runs[name]["dir"])
        tags = set(ea.Tags()["scalars"])
        for key, tag in SCALAR_TAGS.items():
            if key in rows[1]:
                assert [e.step for e in ea.Scalars(tag)] == list(range(1, STEPS + 1)), (name, tag)
                for e in ea.Scalars(tag):
                    assert e.value == pytest.approx(rows[e.step][key], rel=1e-6, abs=1e-12), (name, tag, e.step)
        for s in range(1, STEPS + 1):
            ex = _expected(runs, name, s)
            for dom, d in ex.domains().items():
                assert f"data/mean_weight/{dom}" in tags
                (ev,) = [e for e in ea.Scalars(f"data/mean_weight/{dom}") if e.step == s]
                assert ev.value == pytest.approx(d["mean_weight"], rel=2e-4), (name, s, dom)
                (ev,) = [e for e in ea.Scalars(f"data/weight_mass/{dom}") if e.step == s]
                assert ev.value == pytest.approx(d["weight_mass"], rel=2e-4), (name, s, dom)
            (ev,) = [e for e in ea.Scalars(SCALAR_TAGS["max_weight_bound"]) if e.step == s]
            assert ev.value == pytest.approx(ex.row["max_weight_bound"], rel=1e-6)
        hw = ea.Tensors(HIST_TAGS["weights"])  # explicit (left, right, count) buckets
        hl = ea.Histograms(HIST_TAGS["losses"])
        assert [h.step for h in hw] == [1, 2, 4] == [h.step for h in hl]  # interval 2, and step 1
        for h, l in zip(hw, hl):
            ex = _expected(runs, name, h.step)
            v = tensor_util.make_ndarray(h.tensor_proto)
            w_all = np.concatenate([w[vv & np.isfinite(f)] for w, (f, vv) in zip(ex.w, ex.groups)])
            # every valid sample of every group once: buckets sum to Σ b_g, the weights to k
            assert v[:, 2].sum() == len(w_all) == sum(ex.b), (name, h.step)
            # the logger's buckets, rebuilt here on their own (not from its edges): the weights as it
            # holds them (float32, widened to float64), 40 equal buckets over [0, max(2/b, max w)],
            # the top one closed. So a weight at the max (LinUpper pins every h >= 0 there) is in the
            # top bucket on both sides, whichever float32 rounding each side's max has.
            w32 = w_all.astype(np.float32).astype(np.float64)
            top = max(ex.row["max_weight_bound"], float(w32.max()))
            # the axis reaches the step's bound (or the max weight, if above it)
            assert v[0, 0] == 0.0 and v[-1, 1] == pytest.approx(top, rel=2e-4), (name, h.step)
            assert len(v) == 40, (name, h.step)
            want, _ = np.histogram(w32, bins=np.linspace(0.0, top, len(v) + 1))
            assert want.sum() == len(w_all)  # every weight inside the reference's axis
            # a weight within float32 rounding of an inner edge may fall on either side of it
            assert np.abs(v[:, 2] - want).sum() <= 2, (name, h.step, v[:, 2], want)
            lv = l.histogram_value
            valid_losses = np.concatenate([f[vv & np.isfinite(f)] for f, vv in ex.groups])
            assert sum(lv.bucket) == len(valid_losses) and lv.sum == pytest.approx(valid_losses.sum(), rel=1e-5)


@pytest.mark.slow
def test_samples_tables_use_each_groups_b(runs):
    ids = corpus_ids()
    for name in RUNS:
        samples = read_samples(runs[name]["dir"])
        assert [s["step"] for s in samples] == [1, 2, 4], name
        ea = _acc(runs[name]["dir"])
        top_md = {t.step: t.tensor_proto.string_val[0].decode() for t in ea.Tensors("data/top_weighted/text_summary")}
        for s in samples:
            ex = _expected(runs, name, s["step"])
            rows = [n for n in range(len(ex.prov)) if ex.prov[n] and ex.row_valid(n)]
            assert s["rows_seen"] == len(rows)
            want_top = sorted((ex.bw(n) for n in rows), reverse=True)[:3]
            want_bottom = sorted(ex.bw(n) for n in rows)[:3]
            assert [x["weight_x_b"] for x in s["top"]] == pytest.approx(want_top, rel=2e-4), (name, s["step"])
            assert [x["weight_x_b"] for x in s["bottom"]] == pytest.approx(want_bottom, rel=2e-4), (name, s["step"])
            for x in s["top"] + s["bottom"]:
                assert x["doc_id"] in ids and x["doc_id"] in top_md.get(s["step"], "") + json.dumps(s)
                (n,) = [n for n in rows if max(ex.prov[n], key=lambda d: d.get("n_tokens") or 1)["doc_id"] == x["doc_id"] and
                        abs(ex.groups[ex.where[n][0]][0][ex.where[n][1]] - x["loss"]) < 1e-4 * max(1, abs(x["loss"]))]
                g, i = ex.where[n]
                assert x["weight"] == pytest.approx(ex.w[g][i], rel=2e-4)
                assert x["text"].strip() and x["domain"] in x["doc_id"]


# ---------------------------------------------------------------------------- unit behaviour
def test_record_never_reads_the_device_and_flush_reads_once(tmp_path, monkeypatch):
    rl = RunLogger.Config(log_interval=4, histogram_interval=2, samples_interval=2).build(str(tmp_path), 0)
    gen = torch.Generator().manual_seed(0)
    steps = []
    for step in range(1, 5):
        f = torch.rand(32, generator=gen) * 4
        prov = [[{"domain": "ab"[i % 2], "doc_id": f"doc{i}", "n_tokens": 8}] for i in range(32)]
        steps.append((step, _stats(f), prov, torch.randint(0, 100, (32, 8), generator=gen)))
    calls = {"cpu": 0}

    def boom(name):
        def f(*a, **k):
            raise AssertionError(f"host sync in RunLogger.record: Tensor.{name}")
        return f

    real_cpu = torch.Tensor.cpu
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
            m.setattr(torch.Tensor, name, boom(name))
        for step, st, prov, inp in steps:
            rl.record(step, st, temperature=torch.tensor(0.7), provenance=prov, inputs=inp,
                      extra={"grad_norm": torch.tensor(1.5), "lr": 1e-3})
    with monkeypatch.context() as m:
        for name in ("item", "tolist"):  # .numpy() of the one host copy is fine
            m.setattr(torch.Tensor, name, boom(name))

        def counting_cpu(self, *a, **k):
            calls["cpu"] += 1
            return real_cpu(self, *a, **k)

        m.setattr(torch.Tensor, "cpu", counting_cpu)
        rows = rl.flush()
    assert calls["cpu"] == 1  # the whole interval in one transfer
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["temperature"] == pytest.approx(0.7) and r["grad_norm"] == 1.5 for r in rows)
    rl.close()


def test_bound_violations_counted_and_cap_removes_them(tmp_path):
    # docs/design.md §2: LinUpper, r = 1, one high loss among b = 128: max w = e/(e + 127) > 2/128
    f = torch.zeros(128)
    f[0] = 5.0
    rl = RunLogger.Config(log_interval=10).build(str(tmp_path), 0)
    for step in (1, 2):
        rl.record(step, _stats(f), temperature=1.0)
    rl.record(3, _stats(f, cap=2.0), temperature=1.0)
    rows = rl.flush()
    rl.close()
    e = math.e
    assert rows[0]["max_weight"] == pytest.approx(e / (e + 127), rel=1e-5)
    assert rows[0]["bound_ratio"] == pytest.approx(64 * e / (e + 127), rel=1e-5) and rows[0]["bound_ratio"] > 1
    assert [r["bound_violations"] for r in rows] == [1, 1, 0]
    assert [r["bound_violations_total"] for r in rows] == [1, 2, 2]
    assert rows[2]["bound_ratio"] == pytest.approx(1.0, rel=1e-5)  # capped exactly at 2/b: holds
    assert rl.state_dict()["violations_total"] == 2


def test_several_groups_per_step_and_invalid_samples(tmp_path):
    g1 = _stats([1.0, 2.0, 3.0, 4.0])
    g2 = _stats([1.0, 1.0, 9.0, float("nan")])  # one invalid sample: b = 3 in that group
    rl = RunLogger.Config(log_interval=1).build(str(tmp_path), 0)
    rl.record(1, [g1, g2], temperature=1.0)
    (row,) = rl.flush()
    rl.close()
    assert row["max_weight"] == pytest.approx(max(float(g1.max_weight), float(g2.max_weight)))
    assert row["loss"] == pytest.approx((2.5 + 11 / 3) / 2, rel=1e-6)
    assert row["groups"] == 2
    # the max weight is g2's (the 9.0): judged against g2's own bound 2/3, not 2/4
    assert float(g2.max_weight) > float(g1.max_weight)
    assert row["b"] == 3 and row["max_weight_bound"] == pytest.approx(2 / 3)
    ea = _acc(str(tmp_path))
    from tensorboard.util import tensor_util

    (h,) = ea.Tensors(HIST_TAGS["weights"])
    assert tensor_util.make_ndarray(h.tensor_proto)[:, 2].sum() == 7  # the invalid one left out


def test_bound_is_checked_per_group(tmp_path):
    """Group A (b = 8) breaks its 2/8 with a smaller max weight than group B (b = 3), which holds
    its 2/3. A version judging the step's max weight against the largest group's 2/b reports B's
    weight against 2/8 (ratio > 2, b = 8); one judging A against 2/3 counts no violation."""
    a = _stats([0.0] * 7 + [5.0], temperature=1.0)  # max e/(e+7) = 0.28 > 2/8
    b = _stats([0.0, 0.0, 1.0, float("nan")], temperature=2.0)  # max 0.45 < 2/3
    wa, wb = float(a.max_weight), float(b.max_weight)
    assert 2 / 8 < wa < wb < 2 / 3
    rl = RunLogger.Config(log_interval=1).build(str(tmp_path), 0)
    rl.record(1, [a, b], temperature=1.0)
    rl.record(2, [b, b], temperature=1.0)
    r1, r2 = rl.flush()
    rl.close()
    assert r1["bound_violations"] == 1 and r1["bound_ratio"] == pytest.approx(wa * 8 / 2, rel=1e-6)
    assert r1["max_weight"] == pytest.approx(wb) and r1["b"] == 3 and r1["max_weight_bound"] == pytest.approx(2 / 3)
    assert r2["bound_violations"] == 0 and r2["bound_ratio"] == pytest.approx(wb * 3 / 2, rel=1e-6)
    assert r2["bound_violations_total"] == 1


def test_domain_weights_and_samples_use_each_groups_b(tmp_path):
    """Two micro-batch groups of 4 with uniform weights: every b·w is 1 (a version multiplying by
    all 8 samples of the step reports 2.0), and the weight mass equals the share."""
    groups = [_stats([1.0, 2.0, 3.0, 4.0], strategy="uniform"), _stats([5.0, 6.0, 7.0, 8.0], strategy="uniform")]
    prov = [[{"domain": "ab"[i % 2], "doc_id": f"d{i}", "n_tokens": 8 + 8 * (i % 2)}] for i in range(8)]
    rl = RunLogger.Config(log_interval=1, samples_interval=1, top_k=2).build(str(tmp_path), 0)
    rl.record(1, groups, temperature=1.0, provenance=prov)
    (row,) = rl.flush()
    rl.close()
    for dom in ("a", "b"):
        assert row["domains"][dom]["mean_weight"] == pytest.approx(1.0, rel=1e-6)
        assert row["domains"][dom]["weight_mass"] == pytest.approx(row["domains"][dom]["share"], rel=1e-6)
    (s,) = read_samples(str(tmp_path))
    assert s["b"] == 4 and all(x["weight_x_b"] == pytest.approx(1.0, rel=1e-6) for x in s["top"] + s["bottom"])


def test_other_ranks_write_nothing(tmp_path):
    rl = RunLogger.Config().build(str(tmp_path / "r1"), rank=1)
    rl.record(1, _stats([1.0, 2.0]), temperature=1.0)
    assert rl.flush() == [] and not rl.enabled
    rl.close()
    assert not (tmp_path / "r1").exists()


def test_shares_torchtitans_writer(tmp_path):
    """With TorchTitan's MetricsProcessor writer our tags land in its event directory."""
    from torch.utils.tensorboard import SummaryWriter

    class _TB:  # TorchTitan's TensorBoardLogger and LoggerContainer, as far as tb_writer_of looks
        def __init__(self, d):
            self.writer = SummaryWriter(d)

    class _MP:
        pass

    mp = _MP()
    mp.logger = type("C", (), {})()
    mp.logger._loggers = [object(), _TB(str(tmp_path / "tb" / "20250101-0000"))]
    w = tb_writer_of(mp)
    rl = RunLogger.Config(log_interval=1).build(str(tmp_path), 0, writer=w)
    rl.record(1, _stats([1.0, 3.0]), temperature=1.0)
    rl.close()
    w.close()
    assert event_dirs(str(tmp_path)) == [str(tmp_path / "tb" / "20250101-0000")]


def test_read_metrics_errors_and_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        read_metrics(str(tmp_path))
    p = tmp_path / "metrics.jsonl"
    p.write_text("")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: empty"):
        read_metrics(str(tmp_path))
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3)] + [{"step": 2, "loss": 20.0}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # resumed at 2, killed
    got = read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in got] == [(1, 1.0), (2, 20.0), (3, 3.0)]
    p.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(str(p))


def test_progress_line():
    t = [0.0]
    p = Progress(total=100, clock=lambda: t[0])
    t[0] = 10.0
    line = p.line(20, tokens=40_000, loss=2.5, max_weight=0.02, bound=2 / 128)
    assert line.startswith("step 20/100 (20.0%)")
    assert "eta 40s" in line and "4,000 tok/s" in line and "loss 2.5000" in line
    assert "(1.28 ×) !" in line  # above the bound is flagged
    t[0] = 20.0
    line = p.line(40, tokens=60_000, max_weight=0.01, bound=2 / 128)
    assert "2,000 tok/s" in line and "!" not in line and "eta 30s" in line
    assert fmt_duration(3725) == "1h02m" and fmt_duration(float("nan")) == "?"
    row = {"step": 5, "loss": 1.0, "max_weight": 0.01, "max_weight_bound": 0.0156, "lr": 3e-4}
    assert "lr 0.0003" in Progress(total=None).row_line(row)


def test_fault_counters_in_health_and_no_mfu_without_peak(tmp_path):
    """The trainer's fault counters are TensorBoard's health/ group; without a peak FLOPS (a CPU
    run) no perf/mfu is written; the Custom Scalars layout puts weights/max and 2/b in one chart."""
    from titan_rw.observability.names import tensorboard_layout

    rl = RunLogger.Config(log_interval=1).build(str(tmp_path), 0, num_flops_per_token=1e6, peak_flops=None)
    rl.record(1, _stats([1.0, 3.0]), temperature=1.0, ntokens=128,
              extra={"skipped": torch.tensor(1), "nonfinite_samples": torch.tensor(2), "lr": 1e-3})
    rl.close()
    ea = _acc(str(tmp_path))
    tags = set(ea.Tags()["scalars"])
    assert {"health/skipped", "health/nonfinite_samples", "perf/lr", "perf/tokens_per_sec"} <= tags
    assert not any(t.endswith("mfu") for t in tags) and "perf/skipped" not in tags
    assert ea.Scalars("health/nonfinite_samples")[0].value == 2.0
    layout = tensorboard_layout()
    assert list(layout)[0] == "losses"
    assert ["^weights/max$", "^bound/two_over_b$"] in [c[1] for cat in layout.values() for c in cat.values()]


# ---------------------------------------------------------------------------- granularity = "document"
def _doc(doc_id, domain, n, off):
    return {"dataset": "ds", "doc_id": doc_id, "domain": domain, "n_tokens": n, "row_offset": off}


F_SLOTS = 3
# four packed rows of 64 tokens, as the loader's last_provenance lists them
DOC_ROWS = [
    [_doc("A", "web", 20, 0), _doc("B", "code", 44, 20)],
    [_doc("C", "web", 64, 0)],
    [_doc("D", "web", 10, 0), _doc("E", "code", 12, 10), _doc("G", "code", 14, 22), _doc("H", "code", 8, 36),
     _doc("I", "web", 20, 44)],  # 5 documents in 3 slots: G, H, I merged in the last slot, whose domain is I's (most tokens)
    [_doc("J", "code", 30, 0), _doc("K", "web", 4, 30), _doc("L", "code", 30, 34)],  # K: short (< 8 tokens)
]
# each slot, by hand: (main doc id, its domain, tokens, loss); None: an empty slot
DOC_SLOTS = [("A", "web", 20, 3.0), ("B", "code", 44, 4.5), None,
             ("C", "web", 64, 2.0), None, None,
             ("D", "web", 10, 5.5), ("E", "code", 12, 1.2), ("I", "web", 42, 3.3),
             ("J", "code", 30, 2.6), ("K", "web", 4, 6.0), ("L", "code", 30, 4.0)]


def test_group_layout_per_sample_and_provenance_index():
    a, b, c, d, e = ({"doc_id": x} for x in "abcde")
    lay = GroupLayout(max_documents_per_row=3)
    got = lay.per_sample([[a, b], [c], [a, b, c, d, e], [a, None, b, c], [], None])
    assert got == [a, b, None,  c, None, None,  a, b, [c, d, e],  a, b, c,  None, None, None,  None, None, None]
    assert lay.per_sample([[a, b, c, d]])[2] == [c, d]  # one fragment past the slots: still a list
    rows = [[a], [b, c]]
    assert GroupLayout().per_sample(rows) is rows  # rows: one sample per row
    # provenance_index: rank r's samples in the step's groups concatenated (micro-batch j, then DP
    # rank, then sample), built here by enumerating every group's samples in order
    for k, b_local, dp_size in ((1, 4, 1), (2, 3, 2), (3, 6, 4)):
        for rank in range(dp_size):
            order = [(j, q, s) for j in range(k) for q in range(dp_size) for s in range(b_local)]
            want = [order.index((j, rank, s)) for j in range(k) for s in range(b_local)]
            got = GroupLayout(k, b_local, rank, dp_size).provenance_index(len(want))
            assert (got if got is not None else list(range(len(want)))) == want, (k, b_local, dp_size, rank)
            assert GroupLayout(k, b_local, rank, dp_size).provenance_index(2) in (None, want[:2])
    assert GroupLayout(1, 4, 0, 2).provenance_index(4) is None  # rank 0's rows of one group: the identity
    assert GroupLayout(2, 6, 1, 2, max_documents_per_row=3).provenance_index(12) == [6, 7, 8, 9, 10, 11, 18, 19, 20, 21, 22, 23]


def test_document_granularity_metrics_samples_and_histogram(tmp_path):
    """One reweighting group of document fragments (4 rows × 3 slots, one overflow row), through
    record_step with the rows' provenance: every logged number is recomputed here in float64 from
    the weights, the slots' token counts and the hand-made slot table."""
    from titan_rw.documents import document_weights
    from titan_rw.loss import WeightStats
    from titan_rw.observability.run_logger import StepRecord

    f = torch.tensor([s[3] if s else 0.0 for s in DOC_SLOTS])
    n = torch.tensor([s[2] if s else 0 for s in DOC_SLOTS])
    merged = torch.zeros(len(DOC_SLOTS), dtype=torch.bool)
    merged[8] = True
    w, prior = document_weights(f, n, "dro_kl", 1.0, min_tokens=8, merged=merged)
    stats = WeightStats.of_documents(f, w, n > 0, prior, merged)
    lay = GroupLayout(1, 4 * F_SLOTS, 0, 1, max_documents_per_row=F_SLOTS)
    rl = RunLogger.Config(log_interval=1, histogram_interval=1, samples_interval=1, top_k=2, snippet_chars=1000).build(
        str(tmp_path), 0, layout=lay, total_steps=1, decode=lambda ids: " ".join(map(str, ids)))
    inputs = torch.arange(4)[:, None] * 100 + torch.arange(64)[None, :]  # token t of row q: 100 q + t
    rl.record_step(StepRecord(step=1, groups=[stats], temperature=1.0, lr=1e-3, grad_norm=torch.tensor(0.5),
                              ntokens=256, provenance=DOC_ROWS, inputs=inputs))
    rl.close()
    (row,) = read_metrics(str(tmp_path))

    W = w.double().numpy()
    slots = [(i, s) for i, s in enumerate(DOC_SLOTS) if s]
    N = sum(s[2] for _, s in slots)
    ratio = {i: W[i] / (s[2] / N) for i, s in slots}  # w / pi, pi = n / N
    assert abs(sum(W) - 1) < 1e-6 and ratio[10] == pytest.approx(1.0, rel=1e-5) and ratio[8] == pytest.approx(1.0, rel=1e-5)
    assert row["granularity"] == "document" and row["max_weight_bound"] is None
    assert row["max_weight_ratio"] == pytest.approx(max(ratio.values()), rel=1e-5)
    assert row["bound_ratio"] == pytest.approx(max(ratio.values()) / 2, rel=1e-5)
    assert row["bound_violations"] == int(max(ratio.values()) > 2) == 1  # D's ratio is above c = 2
    assert row["overflow_rows"] == 1 and row["b"] == len(slots) == 9
    assert row["max_weight"] == pytest.approx(W.max(), rel=1e-6)
    assert row["loss"] == pytest.approx(sum(s[2] / N * s[3] for _, s in slots), rel=1e-6)  # token-mean loss
    assert row["weighted_loss"] == pytest.approx(sum(W[i] * s[3] for i, s in slots), rel=1e-6)

    # domains: token share, token-weighted mean of w/pi, share of the weight (Σw)
    tok, num, mass = {}, {}, {}
    for i, (_, dom, k, _) in slots:
        tok[dom] = tok.get(dom, 0) + k
        num[dom] = num.get(dom, 0.0) + k * ratio[i]
        mass[dom] = mass.get(dom, 0.0) + W[i]
    assert set(row["domains"]) == {"web", "code"}
    for dom in tok:
        got = row["domains"][dom]
        assert got["share"] == pytest.approx(tok[dom] / N, rel=1e-6), dom
        assert got["mean_weight"] == pytest.approx(num[dom] / tok[dom], rel=1e-5), dom
        assert got["weight_mass"] == pytest.approx(mass[dom] / sum(W), rel=1e-5), dom

    # samples.jsonl: ranked by w/pi (ties: the higher loss first), the slot's main document
    (s,) = read_samples(str(tmp_path))
    top = sorted(slots, key=lambda x: (-ratio[x[0]], -x[1][3]))[:2]
    bottom = sorted(slots, key=lambda x: (ratio[x[0]], x[1][3]))[:2]
    assert [x[1][0] for x in top] == ["D", "B"] and [x[1][0] for x in bottom] == ["E", "C"]  # the table above
    assert s["rows_seen"] == 9
    for got, want in ((s["top"], top), (s["bottom"], bottom)):
        assert [x["doc_id"] for x in got] == [x[1][0] for x in want]
        assert [x["domain"] for x in got] == [x[1][1] for x in want]
        assert [x["weight_x_b"] for x in got] == pytest.approx([ratio[x[0]] for x in want], rel=1e-5)
        assert [x["weight"] for x in got] == pytest.approx([W[x[0]] for x in want], rel=1e-5)
        assert [x["loss"] for x in got] == pytest.approx([x[1][3] for x in want], rel=1e-6)
    # the snippet is the fragment's own tokens in its row (row_offset .. + n_tokens), from `inputs`;
    # every fragment (top_k = 9) but the merged slot (G, H, I: several documents), which is not shown
    span = {"A": (0, 0, 20), "B": (0, 20, 44), "C": (1, 0, 64), "D": (2, 0, 10), "E": (2, 10, 12),
            "I": (2, 22, 42), "J": (3, 0, 30), "K": (3, 30, 4), "L": (3, 34, 30)}
    rl9 = RunLogger.Config(log_interval=1, samples_interval=1, top_k=9, snippet_chars=1000).build(
        str(tmp_path / "all"), 0, layout=lay, tensorboard=False, decode=lambda ids: " ".join(map(str, ids)))
    rl9.record_step(StepRecord(step=1, groups=[stats], temperature=1.0, lr=1e-3, grad_norm=torch.tensor(0.5),
                               ntokens=256, provenance=DOC_ROWS, inputs=inputs))
    rl9.close()
    (s9,) = read_samples(str(tmp_path / "all"))
    assert sorted(x["doc_id"] for x in s9["top"]) == sorted(set(span) - {"I"}) and s9["rows_seen"] == 9
    for x in s9["top"] + s["top"] + s["bottom"]:
        q, off, k = span[x["doc_id"]]
        assert x["text"] == " ".join(str(100 * q + t) for t in range(off, off + k)), x["doc_id"]

    # TensorBoard: the weight histogram is over w/pi of the 9 fragments, its axis from 0 to c = 2 at least
    ea = _acc(str(tmp_path))
    (h,) = ea.Tensors(HIST_TAGS["weights"])
    v = tensor_util.make_ndarray(h.tensor_proto)
    r = np.array(list(ratio.values()))
    assert v[:, 2].sum() == 9 and v[0, 0] == 0.0
    assert v[-1, 1] == pytest.approx(max(2.0, r.max()), rel=1e-5)
    want, _ = np.histogram(r, bins=np.linspace(0.0, v[-1, 1], len(v) + 1))
    assert np.abs(v[:, 2] - want).sum() <= 2  # fp32 rounding at a bucket edge
    assert (v[:, 2] * (v[:, 0] + v[:, 1]) / 2).sum() == pytest.approx(r.sum(), abs=v[0, 1] * 9)
    tags = set(ea.Tags()["scalars"])
    assert "bound/two_over_b" not in tags  # no 2/b line: the bound is per fragment (ratio vs c)
    (t_ratio,) = [t for t in tags if t.endswith("/max_weight_ratio")]
    (t_over,) = [t for t in tags if t.endswith("/overflow_rows")]
    assert ea.Scalars(t_ratio)[0].value == pytest.approx(max(ratio.values()), rel=1e-5)
    assert ea.Scalars(t_over)[0].value == 1.0
    assert ea.Scalars("bound/ratio")[0].value == pytest.approx(max(ratio.values()) / 2, rel=1e-5)
    for dom in tok:
        assert ea.Scalars(f"data/mean_weight/{dom}")[0].value == pytest.approx(num[dom] / tok[dom], rel=1e-5)
