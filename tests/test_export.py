"""Hugging Face export and import (titan_rw.export, the model spec's `state_dict_adapter`), offline.

One short debug run and one `titan-rw export RUN --hf OUT` of it are shared (tests/hf_helpers.py):
- `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads a `LlamaForCausalLM` whose logits
  equal our model's (the checkpoint loaded by the evaluation adapter) to fp32 tolerance on a real
  batch: rows of the validation corpus, each ONE document from its BOS on (no document boundary
  inside a row, so causal attention, which HF Llama computes, and document-causal attention agree);
- `AutoTokenizer.from_pretrained(OUT)` gives the ids of our sentencepiece model (BOS first) and
  decodes them back to the text, on the validation corpus and awkward strings;
- training starts from OUT with TorchTitan's `checkpoint.initial_load_in_hf` and ends with its
  `checkpoint.last_save_in_hf`: with lr 0 the saved Hugging Face tensors equal the exported ones;
- what TorchTitan refuses (and what cannot work) is a one-line config error before compute.
"""

import glob
import os
import sys

import pytest

from hf_helpers import ROOT, SEQ, TRAIN, run

EDGE = ["", " x", "  leading spaces", "a  b   c", "tab\tand\nnewline\n\n", "12345 67.8", "émoji 🎉 ünïcode",
        "end ", "<s> is text here", "Ω≈ç√∫ ſ ﬁ"]


def _validation_texts(per_file: int):
    import pyarrow.parquet as pq

    from titan_rw.data import EMBEDDED_VALIDATION

    texts = []
    for f in sorted(glob.glob(os.path.join(EMBEDDED_VALIDATION, "*.parquet"))):
        texts += pq.read_table(f, columns=["text"]).column("text").to_pylist()[:per_file]
    return texts


def test_export_loads_in_transformers_with_our_logits(trained_run, hf_folder):
    import torch
    from transformers import AutoModelForCausalLM

    from titan_rw.data import DEFAULT_TOKENIZER
    from titan_rw.data.tokenizer import SentencePieceTokenizer
    from titan_rw.eval.adapter import build_model, load_weights, resolve_checkpoint
    from titan_rw.models import flavor

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "tokenizer.model", "titan_rw_export.json"):
        assert (hf_folder / name).is_file(), name
    hf = AutoModelForCausalLM.from_pretrained(str(hf_folder), local_files_only=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    f = flavor("debug")
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size) == (
        f.dim, f.n_layers, f.n_heads, f.ffn_hidden, f.vocab_size)

    ours = build_model("debug")
    load_weights(ours, resolve_checkpoint(str(trained_run)))
    ours.eval()

    tok = SentencePieceTokenizer(tokenizer_path=str(DEFAULT_TOKENIZER))
    rows = [ids[:SEQ] for ids in (tok.encode(t, add_bos=True, add_eos=False) for t in _validation_texts(3))
            if len(ids) >= SEQ]
    assert len(rows) >= 8
    x = torch.tensor(rows[:8])
    with torch.no_grad():
        theirs = hf(input_ids=x).logits
        mine = ours(x)
    assert theirs.shape == mine.shape == (8, SEQ, f.vocab_size)
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)


def test_exported_tokenizer_gives_sentencepiece_ids(hf_folder):
    from transformers import AutoTokenizer

    from titan_rw.data import DEFAULT_TOKENIZER
    from titan_rw.data.tokenizer import SentencePieceTokenizer

    sp = SentencePieceTokenizer(tokenizer_path=str(DEFAULT_TOKENIZER))
    hf = AutoTokenizer.from_pretrained(str(hf_folder), local_files_only=True)
    assert (hf.bos_token_id, hf.eos_token_id) == (sp.bos_id, sp.eos_id)
    texts = _validation_texts(60) + EDGE
    for t in texts:
        ids = hf(t)["input_ids"]
        assert ids == sp.encode(t, add_bos=True, add_eos=False), repr(t[:80])
        assert hf.decode(ids, skip_special_tokens=True) == t, repr(t[:80])


@pytest.mark.slow
def test_training_starts_from_hf_folder_and_saves_hf(hf_folder, tmp_path):
    """initial_load_in_hf reads the export; last_save_in_hf writes it back (lr 0: the same tensors)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    p = run([sys.executable, "-m", "titan_rw.train", *TRAIN, "--training.steps", "1", "--optimizer.lr", "0",
             "--checkpoint.interval", "1", "--checkpoint.initial_load_in_hf", "true",
             "--checkpoint.initial_load_path", str(hf_folder), "--checkpoint.last_save_in_hf", "true",
             "--checkpoint.last_save_model_only", "true", "--job.dump_folder", str(out)], tmp_path)
    assert "Loading from HF safetensors" in p.stdout + p.stderr
    saved = sorted(glob.glob(str(out / "checkpoint" / "step-1" / "*.safetensors")))
    assert saved, os.listdir(out / "checkpoint" / "step-1")
    got = {}
    for s in saved:
        got.update(load_file(s))
    want = load_file(str(hf_folder / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].equal(want[k]), k


def test_hf_checkpoint_options_are_config_errors(hf_folder, tmp_path, capsys):
    from titan_rw import config
    from titan_rw.models import LlamaStateDictAdapter
    from titan_rw.train import train_main

    base = os.path.join(ROOT, "train_configs", "debug_cpu.toml")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--checkpoint.last_save_in_hf", "true"], "checkpoint.last_save_model_only = true"),
        (["--checkpoint.initial_load_in_hf", "true"], "checkpoint.initial_load_path"),
        (["--checkpoint.initial_load_in_hf", "true", "--checkpoint.initial_load_path", "rel/hf"], "absolute path"),
        (["--checkpoint.initial_load_in_hf", "true", "--checkpoint.initial_load_path", str(empty)], "*.safetensors"),
        (["--checkpoint.initial_load_in_hf", "true", "--checkpoint.initial_load_path", str(hf_folder),
          "--model.flavor", "tiny"], "not a 'tiny' Llama"),
        (["--checkpoint.initial_load_in_hf", "true", "--checkpoint.initial_load_model_only", "false",
          "--checkpoint.initial_load_path", str(hf_folder)], "initial_load_model_only = true"),
    ]
    for overrides, needle in cases:
        with pytest.raises(config.ConfigError) as e:
            config.from_args(base, overrides)
        assert needle in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))
    # the same through the command line: exit code 2 and one line, before any compute
    assert train_main(["--config", base, "--checkpoint.last_save_in_hf", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("titan_rw: config error:") and "\n" not in err
    # a valid combination builds, with TorchTitan's Llama adapter in the model spec
    cfg = config.from_args(base, ["--checkpoint.initial_load_in_hf", "true",
                                  "--checkpoint.initial_load_path", str(hf_folder)])
    assert cfg.model_spec.state_dict_adapter is LlamaStateDictAdapter
    # our tokenizer file is no HF assets folder: the adapter gets none (TorchTitan would open FILE/model.safetensors.index.json)
    adapter = LlamaStateDictAdapter(cfg.model_spec.model, cfg.hf_assets_path)
    assert os.path.isfile(cfg.hf_assets_path) and adapter.hf_assets_path is None


def test_export_refuses_clearly(trained_run, hf_folder, tmp_path, capsys):
    from titan_rw.export import export_main

    assert export_main([str(trained_run), "--hf", str(hf_folder)]) == 2  # a model is there already
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and "\n" not in err
    assert export_main([str(tmp_path / "nothing"), "--hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such checkpoint" in err and "\n" not in err
