"""TokenDataLoader: coverage, world-size freedom, resume, mixture, positions, bad inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import titan_rw  # noqa: F401  (compat patches before torchtitan)
from test_data_helpers import real_shards, synthetic_dataset, validation_shards, write_shard  # noqa: F401
from titan_rw.data.loader import IGNORE_INDEX, STATE_KEY, TokenDataLoader
from titan_rw.data.parquet import DataError


def make(path, *, W=1, k=0, B=2, L=16, tokenizer=None, **cfg):
    if isinstance(path, list):
        cfg["datasets"] = path
    else:
        cfg["dataset_path"] = path
    cfg.setdefault("check_tokenizer", False)
    return TokenDataLoader.Config(**cfg).build(
        dp_world_size=W, dp_rank=k, tokenizer=tokenizer, seq_len=L, local_batch_size=B, snapshot_every_n_steps=None
    )


def global_steps(loaders, n_steps):
    """Concatenate the ranks' batches per step: [(inputs[W*B, L], labels, positions)]."""
    out = []
    its = [iter(l) for l in loaders]
    for _ in range(n_steps):
        parts = [next(it) for it in its]
        out.append(tuple(torch.cat([p[0][key] for p in parts]) for key in ("input", "positions"))
                   + (torch.cat([p[1] for p in parts]),))
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    path, n = synthetic_dataset(str(root / "a"), n_shards=3, docs_per_shard=40, seed=1)
    return path, n


@pytest.mark.parametrize("W", [1, 2, 3])
def test_epoch_covers_every_token_exactly_once(synth, W):
    path, n_tokens = synth
    L, B = 16, 3
    loaders = [make(path, W=W, k=k, B=B, L=L, infinite=False) for k in range(W)]
    n_rows = loaders[0].stream.datasets[0].n_rows
    assert n_rows == -(-n_tokens // L)
    seen_in, seen_lab, steps = [], [], 0
    for batches in zip(*loaders):
        steps += 1
        for x, y in batches:
            inp, lab = x["input"].numpy(), y.numpy()
            seen_in.append(inp[inp > 0])  # tokens are 1..n, padding is 0
            seen_lab.append(lab[lab != IGNORE_INDEX])
            # labels are the next token of the stream (tokens are consecutive integers)
            m = lab != IGNORE_INDEX
            assert np.array_equal(lab[m], inp[m] + 1)
    assert steps == -(-n_rows // (W * B))  # every rank yields the same number of batches
    allin = np.sort(np.concatenate(seen_in))
    assert np.array_equal(allin, np.arange(1, n_tokens + 1)), "holes or duplicates in inputs"
    alllab = np.sort(np.concatenate(seen_lab))
    assert np.array_equal(alllab, np.arange(2, n_tokens + 1)), "holes or duplicates in labels"


def test_real_corpus_shards_cover_every_token(real_shards):
    path, tok = real_shards
    path = validation_shards(path)
    L = 64
    loaders = [make(path, W=2, k=k, B=4, L=L, tokenizer=tok, infinite=False, check_tokenizer=True) for k in range(2)]
    src = loaders[0].stream.datasets[0].source
    expected = np.concatenate([src.read(0, src.n_tokens)])
    counts = np.zeros(src.n_tokens, dtype=np.int64)
    for batches in zip(*loaders):
        for (x, y), l in zip(batches, loaders):
            for row, prov in zip(x["input"].numpy(), l.last_provenance):
                if not prov:
                    continue
                r = prov[0]["row"]
                n = min(L, src.n_tokens - r * L)
                assert np.array_equal(row[:n], expected[r * L: r * L + n])
                counts[r * L: r * L + n] += 1
    assert counts.min() == 1 and counts.max() == 1


@pytest.mark.parametrize("shuffle", [True, False])
def test_global_batch_identical_for_1_2_4_ranks(synth, shuffle):
    path, _ = synth
    ref = None
    for W in (1, 2, 4):
        got = global_steps([make(path, W=W, k=k, B=8 // W, seed=7, shuffle=shuffle) for k in range(W)], 40)
        if ref is None:
            ref = got
        else:
            for a, b in zip(ref, got):
                for ta, tb in zip(a, b):
                    assert torch.equal(ta, tb)
    # 40 steps x 8 rows exceeds one epoch (~ 150 rows): epochs loop with a new order
    assert ref is not None


def test_resume_same_and_other_world_size_continues_the_stream(synth):
    path, _ = synth
    full = global_steps([make(path, W=1, B=12, seed=3)], 30)
    flat = torch.cat([s[0] for s in full])  # global row sequence (inputs)
    # run 7 steps on 2 ranks (global 12), save on each rank
    first = [make(path, W=2, k=k, B=6, seed=3) for k in range(2)]
    head = global_steps(first, 7)
    states = [l.state_dict() for l in first]
    assert torch.equal(states[0][STATE_KEY], states[1][STATE_KEY]), "state must be identical on every rank"
    assert set(states[0]) == {STATE_KEY}
    assert states[0][STATE_KEY].dtype == torch.uint8  # JSON in a tensor, no pickle (docs/resuming.md, "Trust")
    assert torch.equal(torch.cat([s[0] for s in head]), flat[: 7 * 12])
    for W, B in ((2, 6), (4, 3), (3, 4), (1, 5)):
        resumed = [make(path, W=W, k=k, B=B, seed=3) for k in range(W)]
        for l in resumed:
            l.load_state_dict(states[0])
        n = (30 * 12 - 7 * 12) // (W * B)
        cont = torch.cat([s[0] for s in global_steps(resumed, n)])
        assert torch.equal(cont, flat[7 * 12: 7 * 12 + n * W * B]), f"W={W} B={B}"


def test_resume_through_dcp_on_another_world_size(synth, tmp_path):
    """Through DCP with the load planner the checkpoint manager uses (it sizes the JSON tensor)."""
    import torch.distributed.checkpoint as dcp

    from titan_rw.checkpointing import PlainLoadPlanner

    path, _ = synth
    a = make(path, W=2, k=0, B=4, seed=5)
    it = iter(a)
    for _ in range(9):
        next(it)
    dcp.save({"dataloader": a}, checkpoint_id=str(tmp_path / "ckpt"))
    b = make(path, W=4, k=3, B=2, seed=5)
    dcp.load({"dataloader": b}, checkpoint_id=str(tmp_path / "ckpt"), planner=PlainLoadPlanner())
    assert b.stream.global_row == 9 * 8
    ref = make(path, W=1, B=8, seed=5)
    rit = iter(ref)
    for _ in range(9):
        next(rit)
    x_ref, _ = next(rit)
    x_b, _ = next(iter(b))
    assert torch.equal(x_b["input"], x_ref["input"][6:8])


def test_resume_refuses_other_data(synth, tmp_path):
    path, _ = synth
    a = make(path, seed=1)
    next(iter(a))
    other, _ = synthetic_dataset(str(tmp_path / "o"), 1, 10, seed=9)
    b = make(other, seed=1)
    with pytest.raises(ValueError, match="n_tokens"):
        b.load_state_dict(a.state_dict())
    c = make(path, seed=1, L=32)
    with pytest.raises(ValueError, match="seq_len"):
        c.load_state_dict(a.state_dict())


def test_positions_restart_at_documents_and_rows(tmp_path):
    L = 16
    docs = [np.arange(1, 6), np.arange(6, 6 + 3 * L + 5), np.arange(100, 104)]  # 5, 53 (long), 4
    write_shard(str(tmp_path / "s.ds"), docs)
    dl = make(str(tmp_path / "s.ds"), B=1, L=L, shuffle=False, infinite=False)
    ends = np.cumsum([len(d) for d in docs])
    starts = np.concatenate([[0], ends[:-1]])
    rows = list(dl)
    assert len(rows) == -(-ends[-1] // L)
    for r, (x, y) in enumerate(rows):
        pos = x["positions"][0].numpy()
        for i in range(L):
            t = r * L + i
            if t >= ends[-1]:
                break
            d = np.searchsorted(ends, t, side="right")
            assert pos[i] == t - max(starts[d], r * L), (r, i)
        assert pos.max() < L
    # the long document is split across 4 rows, each starting at position 0
    assert sum(1 for x, _ in rows if x["positions"][0, 0] == 0) == len(rows)
    last = rows[-1][1][0].numpy()
    assert last[(ends[-1] - 1) % L] == IGNORE_INDEX  # the dataset's last token has no label


def test_provenance_names_shard_document_domain(tmp_path):
    write_shard(str(tmp_path / "s.ds"), [np.arange(1, 11), np.arange(11, 31)], domains=["wiki", "code"])
    dl = make(str(tmp_path), B=2, L=8, shuffle=False)
    next(iter(dl))
    prov = dl.last_provenance
    assert [d["doc_index"] for d in prov[0]] == [0]
    assert [(d["domain"], d["doc_index"], d["row_offset"], d["n_tokens"]) for d in prov[1]] == [
        ("wiki", 0, 0, 2), ("code", 1, 2, 6)]
    assert prov[1][1]["shard"].endswith("s.ds") and prov[1][1]["doc_id"] == "s.ds:1"


def test_mixture_proportions_match_weights(tmp_path):
    paths = []
    for i, name in enumerate(["a", "b", "c"]):
        p, _ = synthetic_dataset(str(tmp_path / name), 1, 30, seed=i, start=1 + i * 100000, domain=name)
        paths.append(p)
    weights = [0.5, 0.3, 0.2]
    dl = make(paths, weights=weights, B=64, L=8, seed=11)
    counts = {"a": 0, "b": 0, "c": 0}
    n = 0
    for _ in zip(range(100), dl):
        for prov in dl.last_provenance:
            counts[prov[0]["domain"]] += 1
            n += 1
    for name, w in zip("abc", weights):
        p = counts[name] / n
        assert abs(p - w) < 4 * np.sqrt(w * (1 - w) / n), (counts, n)
    # a mixture is world-size free too
    g1 = global_steps([make(paths, weights=weights, W=1, B=8, L=8, seed=11)], 5)
    g2 = global_steps([make(paths, weights=weights, W=2, k=k, B=4, L=8, seed=11) for k in range(2)], 5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(g1, g2))


@pytest.mark.parametrize("w", [0.0, -1.0, float("nan")])
def test_mixture_weight_must_be_positive(synth, w):
    path, _ = synth
    with pytest.raises(DataError, match="weight"):
        make([path, path], weights=[1.0, w])


def test_mixture_weight_count_mismatch(synth):
    path, _ = synth
    with pytest.raises(DataError, match="2 datasets"):
        make([path, path], weights=[1.0])


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        make(str(tmp_path / "none"), format="shards")
    write_shard(str(tmp_path / "e.ds"), [])
    with pytest.raises(DataError, match="empty dataset"):
        make(str(tmp_path / "e.ds"))


def test_truncated_shard_names_the_file(tmp_path):
    p = write_shard(str(tmp_path / "t.ds"), [np.arange(1, 50), np.arange(50, 90)])
    with open(p, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="t.ds"):
        make(p)
    p2 = write_shard(str(tmp_path / "u.ds"), [np.arange(1, 50)])
    os.remove(p2 + ".index")
    with pytest.raises(DataError, match=r"u\.ds\.index"):
        make(p2)


def test_shards_of_another_tokenizer_are_refused(real_shards, tmp_path):
    path, tok = real_shards
    write_shard(str(tmp_path / "x.ds"), [np.arange(1, 50)], tokenizer="/some/other/tokenizer.model#sha256=0123456789abcdef",
                token_size=2)
    with pytest.raises(DataError, match=r"x\.ds.*tokenized with"):
        make(str(tmp_path / "x.ds"), tokenizer=tok, check_tokenizer=True)
    write_shard(str(tmp_path / "y.ds"), [np.arange(1, 50)], tokenizer="gpt2", token_size=2)
    with pytest.raises(DataError, match=r"y\.ds.*gpt2"):
        make(str(tmp_path / "y.ds"), tokenizer=tok, check_tokenizer=True)
    make(path, tokenizer=tok, check_tokenizer=True)  # its own shards load


def test_default_config_streams_the_embedded_corpus():
    from titan_rw.data import DEFAULT_TOKENIZER
    from titan_rw.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer.Config().build(tokenizer_path=DEFAULT_TOKENIZER)
    dl = TokenDataLoader.Config(dataset="embedded_validation").build(
        dp_world_size=2, dp_rank=1, tokenizer=tok, seq_len=128, local_batch_size=4, snapshot_every_n_steps=None)
    x, y = next(iter(dl))
    assert x["input"].shape == x["positions"].shape == y.shape == (4, 128)
    assert x["input"].dtype == torch.long and int(x["input"].max()) < tok.get_vocab_size()
    doms = {d["domain"] for row in dl.last_provenance for d in row}
    assert doms <= {"python_docs", "linux_docs", "wikipedia", "fortunes"} and doms
    assert tok.decode(x["input"][0]).strip()
