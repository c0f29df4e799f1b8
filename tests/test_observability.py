"""RunLogger: metrics.jsonl and TensorBoard event files of a short real run, read back.

The run (tests/obs_helpers.py): a tiny model on the shipped corpus, real per-sample losses,
`reweighted_loss`'s WeightStats and the loader's provenance, logged through RunLogger.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from obs_helpers import B, STEPS, corpus_ids, shared_runs
from titan_rw.loss import reweighted_loss
from titan_rw.observability import (
    HIST_TAGS,
    SCALAR_TAGS,
    RunLogger,
    event_dirs,
    read_metrics,
    read_samples,
    tb_writer_of,
)
from titan_rw.progress import Progress, fmt_duration


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def _acc(run_dir):
    dirs = event_dirs(run_dir)
    assert len(dirs) == 1, dirs
    ea = EventAccumulator(dirs[0], size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def _stats(losses, strategy="linupper", temperature=1.0, cap=None, valid=None):
    return reweighted_loss(
        torch.as_tensor(losses, dtype=torch.float32), temperature, strategy=strategy, cap=cap,
        group=None, dp_rank=0, dp_size=1, valid=valid,
    )[1]


# ---------------------------------------------------------------------------- the real run
def test_metrics_jsonl_one_row_per_step(runs):
    rows = read_metrics(runs["linupper"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["b"] == B and r["strategy"] == "linupper"
        assert r["max_weight_bound"] == pytest.approx(2 / B)
        assert r["bound_ratio"] == pytest.approx(r["max_weight"] * B / 2, rel=1e-6)
        assert 1 <= r["ess"] <= B + 1e-3 and 0 <= r["weight_entropy"] <= math.log(B) + 1e-5
        assert r["max_weight"] >= 1 / B - 1e-7
        assert r["tokens_per_sec"] > 0 and r["mfu"] > 0 and r["grad_norm"] > 0
        dom = r["domains"]
        assert sum(d["share"] for d in dom.values()) == pytest.approx(1.0)
        assert sum(d["weight_mass"] for d in dom.values()) == pytest.approx(1.0, rel=1e-5)
    uni = read_metrics(runs["uniform"])
    for r in uni:  # uniform is exactly 1/b: ESS b, entropy log b, max·b/2 = 1/2, domains at 1
        assert r["max_weight"] == pytest.approx(1 / B) and r["bound_ratio"] == pytest.approx(0.5)
        assert r["ess"] == pytest.approx(B, rel=1e-5) and r["weight_entropy"] == pytest.approx(math.log(B), rel=1e-5)
        assert all(d["mean_weight"] == pytest.approx(1.0, rel=1e-5) for d in r["domains"].values())
        assert r["weighted_loss"] == pytest.approx(r["loss"], rel=1e-5)


def test_scalar_tags_match_metrics(runs):
    rows = {r["step"]: r for r in read_metrics(runs["linupper"])}
    ea = _acc(runs["linupper"])
    tags = set(ea.Tags()["scalars"])
    want = {
        "loss/unweighted", "loss/weighted", "weights/max", "weights/ess", "weights/entropy",
        "weights/temperature", "bound/two_over_b", "bound/ratio", "bound/violations",
        "bound/violations_total", "perf/tokens_per_sec", "perf/mfu", "perf/lr", "perf/grad_norm",
    }
    assert want <= tags, want - tags
    domains = set(rows[STEPS]["domains"])
    assert domains and domains <= {"python_docs", "linux_docs", "wikipedia", "fortunes"}
    for d in domains:
        assert {f"data/mean_weight/{d}", f"data/share/{d}", f"data/weight_mass/{d}"} <= tags
    for key, tag in SCALAR_TAGS.items():
        if key not in rows[1]:
            continue
        events = ea.Scalars(tag)
        assert [e.step for e in events] == list(range(1, STEPS + 1)), tag
        for e in events:
            assert e.value == pytest.approx(rows[e.step][key], rel=1e-6, abs=1e-12), (tag, e.step)


def test_weight_histograms_sum_to_b_and_match_metrics(runs):
    rows = {r["step"]: r for r in read_metrics(runs["linupper"])}
    ea = _acc(runs["linupper"])
    from tensorboard.util import tensor_util

    hw = ea.Tensors(HIST_TAGS["weights"])  # (left, right, count) buckets, empty ones kept
    assert [h.step for h in hw] == [1, 10, 20, 30, 40]  # histogram_interval=10, and step 1
    for h in hw:
        v, r = tensor_util.make_ndarray(h.tensor_proto), rows[h.step]
        assert v[:, 2].sum() == r["b"] == B
        # the axis runs from 0 to max(2/b, max w): the bound is on it (docs/observability.md)
        assert v[0, 0] == 0.0 and v[-1, 1] == pytest.approx(max(r["max_weight_bound"], r["max_weight"]), rel=1e-7)
        assert np.allclose(v[1:, 0], v[:-1, 1])  # contiguous equal buckets
        last = v[v[:, 2] > 0][-1]
        assert last[0] <= r["max_weight"] <= last[1] * (1 + 1e-9)
        centers = (v[:, 0] + v[:, 1]) / 2
        assert (centers * v[:, 2]).sum() == pytest.approx(1.0, abs=B * (v[0, 1] - v[0, 0]) / 2 + 1e-6)  # Σw = 1
    hl = ea.Histograms(HIST_TAGS["losses"])
    for h in hl:
        v, r = h.histogram_value, rows[h.step]
        assert sum(v.bucket) == B and v.sum / v.num == pytest.approx(r["loss"], rel=1e-5)
    win = ea.Histograms("weights/max_window")
    assert [h.step for h in win] == [1, 10, 20, 30, 40]
    last = win[-1].histogram_value
    assert last.num == STEPS and last.max == pytest.approx(max(r["max_weight"] for r in rows.values()), rel=1e-7)
    assert ea.Histograms("bound/ratio_window")[-1].histogram_value.max <= 1.0  # b = 16, r = 0.5 holds


def test_text_samples_name_real_documents(runs):
    ids = corpus_ids()
    ea = _acc(runs["linupper"])
    top = ea.Tensors("data/top_weighted/text_summary")
    bottom = ea.Tensors("data/bottom_weighted/text_summary")
    assert [t.step for t in top] == [1, 20, 40] and len(bottom) == 3
    samples = read_samples(runs["linupper"])
    assert [s["step"] for s in samples] == [1, 20, 40]
    for s, t_top, t_bot in zip(samples, top, bottom):
        assert len(s["top"]) == len(s["bottom"]) == 3 and s["b"] == B
        assert min(x["weight"] for x in s["top"]) >= max(x["weight"] for x in s["bottom"])
        md = t_top.tensor_proto.string_val[0].decode() + t_bot.tensor_proto.string_val[0].decode()
        for x in s["top"] + s["bottom"]:
            assert x["doc_id"] in ids, x["doc_id"]
            assert x["doc_id"] in md and x["url"] and x["url"] in md
            assert x["text"].strip() and x["domain"] in x["doc_id"]
    rows = {r["step"]: r for r in read_metrics(runs["linupper"])}
    assert samples[-1]["top"][0]["weight"] == pytest.approx(rows[STEPS]["max_weight"], rel=1e-7)


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
        rows = rl.flush(4)
    assert calls["cpu"] == 1  # the whole interval in one transfer
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["temperature"] == pytest.approx(0.7) and r["grad_norm"] == 1.5 for r in rows)
    rl.close()


def test_bound_violations_counted_and_cap_removes_them(tmp_path):
    # DESIGN.md §2: LinUpper, r = 1, one high loss among b = 128: max w = e/(e + 127) > 2/128
    f = torch.zeros(128)
    f[0] = 5.0
    rl = RunLogger.Config(log_interval=10).build(str(tmp_path), 0)
    for step in (1, 2):
        rl.record(step, _stats(f), temperature=1.0)
    rl.record(3, _stats(f, cap=2.0), temperature=1.0)
    rows = rl.flush(3)
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
    (row,) = rl.flush(1)
    rl.close()
    assert row["max_weight"] == pytest.approx(max(float(g1.max_weight), float(g2.max_weight)))
    assert row["loss"] == pytest.approx((2.5 + 11 / 3) / 2, rel=1e-6)
    assert row["b"] == 4
    ea = _acc(str(tmp_path))
    from tensorboard.util import tensor_util

    (h,) = ea.Tensors(HIST_TAGS["weights"])
    assert tensor_util.make_ndarray(h.tensor_proto)[:, 2].sum() == 7  # the invalid one left out


def test_other_ranks_write_nothing(tmp_path):
    rl = RunLogger.Config().build(str(tmp_path / "r1"), rank=1)
    rl.record(1, _stats([1.0, 2.0]), temperature=1.0)
    assert rl.flush(1) == [] and not rl.should_flush(1)
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
    from titan_rw.observability import tensorboard_layout

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
