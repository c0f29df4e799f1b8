"""The duplicates experiment at tiny size, two seeds, rows and document fragments as samples:
LinUpper gives duplicated (low-loss, redundant) samples a lower mean weight than unique ones (the
paper's claim), uniform gives everyone its uniform share; the bookkeeping (token shares, paired
differences, seeds) checked against independent recomputations."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titan_rw.experiments.duplicates import cli, config, data, training
from titan_rw.experiments.duplicates import runs as run_set

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("duplicates")
    threads = torch.get_num_threads()
    try:
        rc = cli.main([
            "--quick", "--steps", "60", "--eval-every", "30", "--seeds", ",".join(map(str, SEEDS)),
            "--granularity", "both", "--check-uniform-document", "--threads", "1", "--out", str(out),
        ])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def _results(out):
    return json.loads((out / "results.json").read_text())


def _runs(res):
    """{(seed, granularity, strategy): summary}"""
    return {(ps["seed"], r["granularity"], r["strategy"]): r for ps in res["seeds"] for r in ps["runs"]}


def test_linupper_downweights_duplicates(quick_run):
    res = _results(quick_run)
    runs = _runs(res)
    for seed in SEEDS:
        for g in ("row", "document"):
            r = runs[(seed, g, "linupper")]
            w = r["weight"]
            assert w["dup"] < 1.0 < w["unique"], (seed, g, w)  # the weight relative to uniform averages 1
            # they are down-weighted because their loss is lower
            assert r["loss"]["dup"] < r["loss"]["unique"], (seed, g)
        u = runs[(seed, "row", "uniform")]["weight"]
        assert u["dup"] == pytest.approx(1.0, abs=1e-5) and u["unique"] == pytest.approx(1.0, abs=1e-5)
    for r in runs.values():
        # it learns: the held-out loss falls well below the untrained model's (~8.1, above
        # log 2048 = 7.62 since a fresh model is not uniform) and below the uniform guess
        (s0, v0), (s_end, v_end) = r["val_curve"][0], r["val_curve"][-1]
        assert s0 == 0 and s_end == 60 and v_end == r["val_loss"] and np.isfinite(v_end)
        assert v_end < v0 - 1.2, r["val_curve"]
        assert v_end < np.log(2048) - 0.8, r["val_curve"]
        assert r["fragment_mismatch"] == 0


def test_uniform_is_the_token_mean_at_both_granularities(quick_run):
    """Full rows of equal length: the mean of row means is the token mean, i.e. uniform at row
    granularity trains the same model as uniform at document granularity (w_d = n_d / N)."""
    runs = _runs(_results(quick_run))
    a, b = runs[(SEEDS[0], "row", "uniform")], runs[(SEEDS[0], "document", "uniform")]
    np.testing.assert_allclose(a["train_token_mean_loss"], b["train_token_mean_loss"], atol=1e-5)
    np.testing.assert_allclose([v for _, v in a["val_curve"]], [v for _, v in b["val_curve"]], atol=1e-5)
    assert (SEEDS[1], "document", "uniform") not in runs  # uniform runs once per seed otherwise


def test_paired_differences_recomputed(quick_run):
    res = _results(quick_run)
    runs = _runs(res)
    summary = {s["run"]: s for s in res["summary"]}
    for g in ("row", "document"):
        s = summary[f"linupper / {g}"]
        diffs = [runs[(seed, g, "linupper")]["val_loss"] - runs[(seed, "row", "uniform")]["val_loss"] for seed in SEEDS]
        assert s["seeds"] == list(SEEDS)
        assert s["diff_vs_uniform"] == pytest.approx(diffs, abs=1e-12)
        assert s["diff_mean"] == pytest.approx(statistics.mean(diffs), abs=1e-12)
        assert s["diff_std"] == pytest.approx(statistics.stdev(diffs), abs=1e-12)
        assert s["seeds_better"] == sum(d < 0 for d in diffs)
        vals = [runs[(seed, g, "linupper")]["val_loss"] for seed in SEEDS]
        assert s["val_loss_mean"] == pytest.approx(statistics.mean(vals), abs=1e-12)
        assert s["val_loss_std"] == pytest.approx(statistics.stdev(vals), abs=1e-12)
    assert "diff_mean" not in summary["uniform"]


def test_seeds_differ(quick_run):
    res = _results(quick_run)
    d0, d1 = (ps["data"] for ps in res["seeds"])
    assert d0["duplicated_pieces"] == d1["duplicated_pieces"] == 20
    assert d0["documents_written"] == d1["documents_written"] == 400 - 20 + 20 * 20
    assert set(d0["duplicated_ids"]) != set(d1["duplicated_ids"])
    runs = _runs(res)
    v0 = [runs[(seed, "row", "uniform")]["val_curve"][0][1] for seed in SEEDS]  # different initial weights
    assert abs(v0[0] - v0[1]) > 1e-4
    # within a seed every run starts from the same model
    for seed in SEEDS:
        starts = {r["val_curve"][0][1] for (s, _, _), r in runs.items() if s == seed}
        assert len(starts) == 1


def test_outputs(quick_run):
    data = (quick_run / "duplicates.png").read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    raw = np.load(quick_run / "seed1" / "linupper_document.npz")
    assert raw["bw"].shape[0] == 60 and raw["bw"].shape == raw["share"].shape == raw["n_tokens"].shape


def _batch_and_model(tmp_path):
    cfg = config.DupConfig(flavor="tiny", seq_len=64, batch_size=8, max_docs=60, piece_chars=300, seed=3)
    path, _ = data.build_dataset(cfg, str(tmp_path))
    dl = training._loader(cfg, dataset_path=path, format="parquet")
    for input_dict, labels in dl:
        if (labels != -100).all():  # a batch without the padded last row
            break
    return cfg, training._build_model(cfg), input_dict, labels, dl.last_provenance


def test_document_weights_against_provenance(tmp_path):
    """Fragment losses and uniform weights recomputed from the loader's provenance (row offsets and
    token counts, not the positions) and a float64 cross-entropy of the full logits."""
    cfg, model, inp, labels, prov = _batch_and_model(tmp_path)
    assert any(len(p) >= 3 for p in prov)  # short pieces: rows hold several documents
    loss, rec = training.step_loss(model, inp["input"], inp["positions"], labels, granularity="document",
                              strategy="uniform", temperature=1.0, cfg=cfg)
    with torch.no_grad():
        hidden = model(inp["input"], positions=inp["positions"]).double()
        logits = hidden @ model.lm_head.weight.double().t()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        nll = nll.view(labels.shape).numpy()
    n_all = sum(d["n_tokens"] for p in prov for d in p)
    assert n_all == labels.numel()
    Fs = cfg.max_documents_per_row
    w, f, n = (rec[k].reshape(-1, Fs) for k in ("weights", "losses", "n_tokens"))
    for j, docs in enumerate(prov):
        for k in range(Fs):
            if k < len(docs):
                d = docs[k]
                assert n[j, k] == d["n_tokens"]
                assert w[j, k] == pytest.approx(d["n_tokens"] / n_all, rel=1e-5)
                seg = nll[j, d["row_offset"] : d["row_offset"] + d["n_tokens"]]
                assert f[j, k] == pytest.approx(seg.mean(), rel=1e-4, abs=1e-4)
            else:
                assert n[j, k] == 0 and w[j, k] == 0
    assert float(loss.detach()) == pytest.approx(nll.mean(), rel=1e-4)  # uniform = the token mean

    # LinUpper: weights still sum to 1, fragments under min_tokens keep their token share
    _, rec = training.step_loss(model, inp["input"], inp["positions"], labels, granularity="document",
                           strategy="linupper", temperature=1.0, cfg=cfg)
    w, pi, n = rec["weights"], rec["prior"], rec["n_tokens"]
    assert w.sum() == pytest.approx(1.0, abs=1e-5)
    short = (n > 0) & (n < cfg.min_document_tokens)
    assert short.any() and np.allclose(w[short], pi[short], rtol=1e-5)
    assert not np.allclose(w[n > 0], pi[n > 0], rtol=1e-3)
    # rows: uniform 1/b each
    _, rec = training.step_loss(model, inp["input"], inp["positions"], labels, granularity="row",
                           strategy="uniform", temperature=1.0, cfg=cfg)
    assert np.allclose(rec["weights"], 1 / cfg.batch_size) and np.allclose(rec["prior"], 1 / cfg.batch_size)


def test_temperature_warmup(tmp_path):
    """r = 100 for the first 4 steps (App. A.2): LinUpper's scores lie in [0, 1], so every weight
    is within e^(±1/100) of its uniform share then, and spreads wider at r = 1 afterwards."""
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["--quick", "--steps", "8", "--eval-every", "0", "--no-plot", "--strategies", "linupper",
                       "--granularity", "both", "--temp-warmup-steps", "4", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    for g in ("row", "document"):
        bw = np.load(tmp_path / "seed0" / f"linupper_{g}.npz")["bw"]
        warm, after = bw[:4][np.isfinite(bw[:4])], bw[4:][np.isfinite(bw[4:])]
        assert warm.min() >= math.exp(-0.01) - 1e-6 and warm.max() <= math.exp(0.01) + 1e-6, g
        assert after.max() > math.exp(0.1), g


def test_fragment_dup_share_merges_overflow():
    prov = [
        [{"doc_id": "a", "n_tokens": 30}, {"doc_id": "b#c01", "n_tokens": 10}, {"doc_id": "c", "n_tokens": 30}],
        [{"doc_id": "b", "n_tokens": 64}],
        [],
    ]
    q = data.fragment_dup_share(prov, {"b", "b#c01"}, max_documents_per_row=2)
    assert q.shape == (3, 2)
    assert q[0, 0] == 0.0 and q[0, 1] == pytest.approx(10 / 40)  # slot 1 holds b#c01 and c
    assert q[1, 0] == 1.0 and np.isnan(q[1, 1]) and np.isnan(q[2]).all()


def test_split_text_round_trips():
    text = "a" * 50 + "\n" + "b" * 5000 + "\nshort\n" + "c" * 30
    pieces = data._split_text(text, 2000)
    assert "".join(pieces) == text
    assert all(len(p) <= 2000 for p in pieces)
    assert data._split_text("tiny", 2000) == ["tiny"]


def test_row_dup_share():
    prov = [
        [{"doc_id": "a", "n_tokens": 30}, {"doc_id": "b#c01", "n_tokens": 10}],
        [{"doc_id": "b", "n_tokens": 64}],
        [],
    ]
    q = data.row_dup_share(prov, {"b", "b#c01"})
    assert q[0] == pytest.approx(0.25) and q[1] == 1.0 and np.isnan(q[2])


def test_seeds_argument_and_plan():
    assert cli._seeds_arg("3") == (0, 1, 2) and cli._seeds_arg("0,5,7") == (0, 5, 7) and cli._seeds_arg("4,") == (4,)
    cfg = config.DupConfig(granularity="both", strategies=("uniform", "linupper"), check_uniform_document=True)
    assert run_set.run_plan(cfg, True) == [("row", "uniform"), ("document", "uniform"), ("row", "linupper"),
                                       ("document", "linupper")]
    assert run_set.run_plan(cfg, False) == [("row", "uniform"), ("row", "linupper"), ("document", "linupper")]


def test_rejects_unknown_strategy(tmp_path, capsys):
    assert cli.main(["--quick", "--strategies", "uniform,nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
