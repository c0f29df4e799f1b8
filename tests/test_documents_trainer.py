"""The real trainer at `reweight.granularity = "document"` (issue 16): gloo process groups, CPU, tiny Llama.

- Hand-made packed rows (tests/documents_worker.py, 1 and 2 ranks): the step's gradients equal a
  float64 single-process reference; `uniform` is the plain token-mean cross-entropy of the group
  (microbatch scope with k micro-batches: the mean of the k micro-batch token means, not the token
  mean of the whole step); `linupper` (capped or not) is sum_d w_d grad f_d with w_d computed
  independently; rows holding one document each get the row granularity's weights.
- `python -m titan_rw.train --config train_configs/debug_cpu.toml --reweight.granularity document`
  on the shipped fortunes (short documents, several per 128-token row): 1 and 2 ranks log the same
  steps (scope global_batch); the rows say granularity "document", max_weight_bound null,
  max_weight_ratio <= cap 2, overflow_rows and b as counted from the loader's own batches; a run
  SIGKILLed after step 3 and resumed from step 2 logs steps 3-4 bit for bit like an uninterrupted one.
- samples.jsonl: every top/bottom entry is one fragment of one document (its text a substring of
  that document, its weight / weight_x_b the fragment's token share n_d / N).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_resume import _run

from helpers import ROOT, metrics_by_step, subprocess_env  # noqa: E402
pytestmark = pytest.mark.slow

FORTUNES = os.path.join(ROOT, "titan_rw", "assets", "corpus", "train", "fortunes.parquet")
STEPS, SEQ, SLOTS, MIN_TOKENS, CAP = 4, 128, 4, 8, 2.0
DOCS = [
    "--training.steps", str(STEPS), "--training.seq_len", str(SEQ), "--data.dataset_path", FORTUNES,
    "--reweight.granularity", "document", "--reweight.max_documents_per_row", str(SLOTS),
    "--reweight.min_document_tokens", str(MIN_TOKENS), "--reweight.cap", str(CAP), "--reweight.temperature", "0.2",
    "--reweight.warmup_steps", "1", "--logging.samples_interval", "2",
]


# ---------------------------------------------------------------------- gradients (hand-made rows)
def test_document_gradients_equal_float64_reference(tmp_path):
    procs = {}
    for n in (1, 2):  # both launches at once: each is mostly start-up
        env = subprocess_env(str(tmp_path))
        env["RW_DUMP"] = str(tmp_path / f"dump{n}")
        log = open(tmp_path / f"worker{n}.log", "w")
        procs[n] = (subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                                      os.path.join(ROOT, "tests", "documents_worker.py"),
                                      str(tmp_path / f"res{n}.json")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                    log)
    for n, (p, log) in procs.items():
        rc = p.wait(timeout=300)
        log.close()
        assert rc == 0, (tmp_path / f"worker{n}.log").read_text()[-6000:]
    for n in (1, 2):
        res = json.loads((tmp_path / f"res{n}.json").read_text())
        assert set(res) == {"uniform_microbatch", "linupper_microbatch", "uniform_global", "linupper_global",
                            "linupper_cap_global", "uniform_accum_microbatch", "rows_vs_documents"}, n
        for name, r in res.items():
            if name == "rows_vs_documents":
                continue
            where = (n, name, r)
            assert r["groups"] == (2 if name == "uniform_accum_microbatch" else 1), where
            # the trainer's step == sum_d w_d grad f_d with the independent float64 weights
            assert r["grad_err"] <= 5e-5 * r["grad_scale"], where
            assert r["weight_err"] <= 1e-5 and r["prior_err"] <= 1e-6, where
            assert all(abs(s - 1.0) <= 1e-5 for s in r["weights_sum"]), where
            assert r["mean_loss_err"] <= 1e-5 and r["weighted_loss_err"] <= 1e-5, where
            assert r["overflow_rows"] == r["ref_overflow_rows"], where
            assert r["max_ratio"] == pytest.approx(r["ref_max_ratio"], rel=1e-4), where
            # the batches hold what they should: short fragments (kept at pi_d), empty slots
            assert r["short_long"][0] >= 1 and r["short_long"][1] >= 2 and r["empty_slots"] >= 1, where
            if name.startswith("uniform"):  # exactly the plain token-mean loss (per micro-batch group)
                assert r["token_mean_grad_err"] <= 1e-5 * r["grad_scale"], where
                assert all(m == pytest.approx(1.0, abs=1e-6) for m in r["max_ratio"]), where
            else:  # reweighting moves the gradient far beyond the comparison's error
                assert r["moved"] > 100 * max(r["grad_err"], 1e-9), where
                assert max(r["max_ratio"]) > 1.1, where
        assert sum(res["uniform_global"]["ref_overflow_rows"]) >= 1  # an overflow row, its tail merged
        assert max(res["linupper_cap_global"]["max_ratio"]) <= CAP * (1 + 1e-6)
        # microbatch scope, k = 2: (token mean of micro-batch 1 + of micro-batch 2) / 2, which is not
        # the token mean of the whole step (the micro-batches hold different numbers of valid tokens)
        acc = res["uniform_accum_microbatch"]
        assert acc["step_token_mean_grad_err"] > 100 * max(acc["token_mean_grad_err"], 1e-9), acc
        # every row one document: the same weights as granularity = "row"
        rv = res["rows_vs_documents"]
        assert rv["b"] == 2 * n and rv["spread"] > 0.1, rv
        assert rv["weight_err"] <= 1e-5 and rv["other_slots"] == 0.0 and rv["loss_err"] <= 1e-5, rv
    res1 = json.loads((tmp_path / "res1.json").read_text())
    assert res1["linupper_cap_global"]["max_ratio"][0] == pytest.approx(CAP, rel=1e-6)  # the cap binds


# ---------------------------------------------------------------------- python -m titan_rw.train
@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("documents"))
    p = lambda name: os.path.join(base, name)  # noqa: E731
    _run(base, p("one"), *DOCS)  # 1 process, uninterrupted (checkpoints at 2 and 4)
    _run(base, p("two"), *DOCS, "--checkpoint.enable", "false", nproc=2)
    _run(base, p("kill"), *DOCS, "--fault_injection.kill_at_step", "3", expect=-9)  # SIGKILL after step 3
    with open(os.path.join(p("kill"), "metrics.jsonl")) as fh:
        killed = [json.loads(line) for line in fh]
    _, log = _run(base, p("kill"), *DOCS)  # resumes from step-2
    return {"one": p("one"), "two": p("two"), "kill": p("kill"), "killed_rows": killed, "resume_log": log}


@pytest.fixture(scope="module")
def served():
    """The steps' global batches as the loader serves them (16 rows of 128 tokens per step, the same
    for any number of ranks): per step (labels [16, 128], provenance per row)."""
    from titan_rw.data.loader import TokenDataLoader

    dl = TokenDataLoader(TokenDataLoader.Config(dataset_path=FORTUNES), seq_len=SEQ, local_batch_size=16)
    out = {}
    for step in range(1, STEPS + 1):
        _, labels = dl.next_batch()
        out[step] = (labels.numpy(), dl.last_provenance)
    return out


def _fragments(labels, prov):
    """(row, slot, doc_id, valid tokens, merged) of every document fragment of a step, from the
    loader's provenance (row_offset, n_tokens), slots as the trainer numbers them."""
    out = []
    for r, docs in enumerate(prov):
        for i, d in enumerate(docs):
            lo, n = d["row_offset"], d["n_tokens"]
            out.append((r, min(i, SLOTS - 1), d["doc_id"], int((labels[r, lo:lo + n] != -100).sum()),
                        len(docs) > SLOTS and i >= SLOTS - 1))
    return out


KEYS = ("loss", "weighted_loss", "max_weight", "max_weight_ratio", "overflow_rows", "b", "grad_norm", "lr", "temperature")


def test_document_runs_one_and_two_ranks(doc_runs, served):
    one, two = metrics_by_step(doc_runs["one"]), metrics_by_step(doc_runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for s in one:
        a, b = one[s], two[s]
        for k in ("loss", "weighted_loss", "max_weight_ratio", "max_weight"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (s, k, a[k], b[k])
        labels, prov = served[s]
        frags = _fragments(labels, prov)
        slots = {(r, slot) for r, slot, _, n, _ in frags if n > 0}
        for row in (a, b):
            assert row["granularity"] == "document" and row["max_weight_bound"] is None
            assert row["max_weight_ratio"] <= CAP * (1 + 1e-6), (s, row["max_weight_ratio"])
            assert row["overflow_rows"] == sum(len(d) > SLOTS for d in prov), (s, row["overflow_rows"])
            assert row["b"] == len(slots), (s, row["b"])  # the non-empty fragment slots of the step
    assert sum(one[s]["overflow_rows"] for s in one) >= 1
    assert max(one[s]["max_weight_ratio"] for s in one) >= CAP * (1 - 1e-6)  # the cap binds at some step
    assert one[1]["temperature"] == 100.0 and one[2]["temperature"] == 0.2


def test_document_run_resumes_bit_for_bit(doc_runs):
    ref, res = metrics_by_step(doc_runs["one"]), metrics_by_step(doc_runs["kill"])
    assert sorted(res) == list(range(1, STEPS + 1))
    assert [r["step"] for r in doc_runs["killed_rows"]] == [1, 2, 3]
    assert "resumed from the checkpoint of step 2" in doc_runs["resume_log"]
    for s in (3, 4):  # the resumed steps
        for k in KEYS:
            assert res[s][k] == ref[s][k], (s, k, res[s][k], ref[s][k])
    with open(os.path.join(doc_runs["one"], "samples.jsonl")) as a, open(os.path.join(doc_runs["kill"], "samples.jsonl")) as b:
        sa, sb = ({r["step"]: r for r in map(json.loads, f)} for f in (a, b))
    assert sorted(sa) == sorted(sb) == [1, 2, 4] and sa[4] == sb[4]


def test_document_samples_are_single_fragments(doc_runs, served):
    import pyarrow.parquet as pq

    docs = {r["id"]: r for r in pq.read_table(FORTUNES, columns=["id", "url", "text"]).to_pylist()}
    with open(os.path.join(doc_runs["one"], "samples.jsonl")) as fh:
        samples = [json.loads(line) for line in fh]
    assert [s["step"] for s in samples] == [1, 2, 4]
    seen = 0
    for s in samples:
        labels, prov = served[s["step"]]
        N = int((labels != -100).sum())  # scope global_batch: the step is one group
        frags = _fragments(labels, prov)
        assert s["rows_seen"] == len({(r, slot) for r, slot, _, n, _ in frags if n > 0})  # non-empty slots
        for e in s["top"] + s["bottom"]:
            doc = docs[e["doc_id"]]
            assert e["url"] == doc["url"] and e["domain"] == "fortunes"
            # its text is this document's own text (a fragment of it), not a row's or a neighbour's
            text = e["text"][:-1] if e["text"].endswith("…") else e["text"]
            assert text and text in " ".join(doc["text"].split()), (e, doc["text"])
            # weight_x_b = w_d / pi_d, pi_d = n_d / N of one fragment of this document in the step
            pis = [n / N for _, _, did, n, _ in frags if did == e["doc_id"] and n > 0]
            assert any(e["weight"] / pi == pytest.approx(e["weight_x_b"], rel=1e-5) for pi in pis), (e, pis, N)
            seen += 1
    assert seen == 18
    assert any(len(_fragments(*served[s["step"]])) > 16 for s in samples)  # rows really hold several documents
