"""`titan-rw export RUN [--step N] --hf OUT`: a Hugging Face `transformers` Llama folder from a checkpoint.

    titan-rw export runs/debug_cpu --hf runs/debug_cpu/hf
    titan-rw export runs/debug_cpu --step 200 --hf /tmp/llama-step200 --dtype bfloat16

OUT then holds what `transformers.AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` read: `model.safetensors` (sharded with an index above
`--max-shard-size`), `config.json` (`LlamaForCausalLM`), `generation_config.json`, the tokenizer
(`tokenizer.json` converted from the run's sentencepiece model, which is copied as
`tokenizer.model` too) and `titan_rw_export.json` (which checkpoint, step, flavor, tokenizer hash).

The weights go through TorchTitan's `Llama3StateDictAdapter` (`titan_rw.models.LlamaStateDictAdapter`,
the model spec's `state_dict_adapter`): the same conversion `checkpoint.last_save_in_hf` uses, and
`checkpoint.initial_load_in_hf` reads such a folder back. Only the model's tensors are read from a
training checkpoint (DCP reads just those keys), so exporting needs memory for the model once,
and no GPU. The checkpoint can be a run folder (latest step, or `--step N`), a DCP `step-N`
folder, a consolidated `.pt`/`.safetensors` state dict, or a `last_save_in_hf` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


class ExportError(ValueError):
    """An export that cannot be done, with what to do about it."""


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def hf_llama_config(flavor: str, *, bos_token_id: int | None, eos_token_id: int | None, dtype: str = "float32"):
    """`transformers.LlamaConfig` of a titan_rw flavor (read from the TorchTitan model config)."""
    from transformers import LlamaConfig

    from titan_rw.models import flavor as get_flavor, model_config

    f = get_flavor(flavor)
    cfg = model_config(flavor, attn_backend="sdpa")
    attn = cfg.layers[0].attention
    rope = attn.rope
    if rope.scaling != "none":
        raise ExportError(f"flavor {flavor}: RoPE scaling {rope.scaling!r} has no export mapping (only unscaled RoPE)")
    n_heads = attn.n_heads
    n_kv = attn.n_kv_heads or n_heads
    return LlamaConfig(
        vocab_size=f.vocab_size,
        hidden_size=f.dim,
        intermediate_size=f.ffn_hidden,
        num_hidden_layers=f.n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=attn.head_dim or f.dim // n_heads,
        hidden_act="silu",
        max_position_embeddings=f.max_seq_len,
        rms_norm_eps=cfg.norm.eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope.theta)},
        tie_word_embeddings=bool(getattr(cfg, "enable_weight_tying", False)),
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )


def _meta_state_dict(flavor: str):
    """The model's canonical state-dict keys and shapes (no memory: a meta-device model)."""
    import torch
    from torchtitan.components.checkpoint import ModelWrapper

    from titan_rw.models import model_config

    cfg = model_config(flavor, attn_backend="sdpa")
    with torch.device("meta"):
        model = cfg.build()
    return cfg, ModelWrapper(model).state_dict()


def read_model_state(ck, flavor: str) -> dict:
    """The model's tensors of a resolved checkpoint, with TorchTitan's canonical keys, on CPU."""
    import torch

    from titan_rw.eval.adapter import load_consolidated, checkpoint_shapes
    from titan_rw.models import model_spec

    cfg, meta = _meta_state_dict(flavor)
    if ck.kind == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(str(ck.path)).read_metadata().state_dict_metadata
        missing = [k for k in meta if k not in md]
        if missing:
            raise ExportError(f"{ck.path}: checkpoint lacks model tensors {missing[:5]} (is it a {flavor} checkpoint?)")
        sd = {k: torch.empty(tuple(md[k].size), dtype=md[k].properties.dtype) for k in meta}
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": a single-process read is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, checkpoint_id=str(ck.path), no_dist=True)
    else:
        stored = load_consolidated(ck)
        if any(k.startswith("model.") for k in stored) and "tok_embeddings.weight" not in stored:
            # Hugging Face names (a `last_save_in_hf` checkpoint, or an export): the adapter maps them back
            stored = model_spec(flavor).state_dict_adapter(cfg, None).from_hf(dict(stored))
        missing = [k for k in meta if k not in stored]
        if missing:
            raise ExportError(f"{ck.path}: checkpoint lacks model tensors {missing[:5]} (is it a {flavor} checkpoint?)")
        sd = {k: stored[k] for k in meta}
    for k, v in sd.items():
        if tuple(v.shape) != tuple(meta[k].shape):
            raise ExportError(f"{ck.path}: {k} has shape {tuple(v.shape)}, flavor {flavor} needs {tuple(meta[k].shape)}; "
                              f"pass the run's flavor with --flavor")
    return sd


def _resolve(checkpoint: str, step: int | None):
    """Resolved checkpoint; a folder holding `*.safetensors` with HF names (last_save_in_hf) counts too."""
    from titan_rw.eval.adapter import CheckpointError, ResolvedCheckpoint, resolve_checkpoint

    try:
        return resolve_checkpoint(checkpoint, step=step)
    except CheckpointError:
        p = Path(checkpoint).expanduser().resolve()
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
        if len(files) == 1:
            return ResolvedCheckpoint(files[0], "safetensors", p.parent.parent, None)
        raise


def _save_tokenizer(model_path: str, out: Path) -> None:
    """The sentencepiece model as `tokenizer.model`, and transformers' `LlamaTokenizer` converted from it."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_path, os.path.join(tmp, "tokenizer.model"))
        # Our sentencepiece model: identity normalization, no dummy prefix; "legacy" keeps
        # transformers from adding a prefix space, and split_special_tokens reads "<s>" in a text
        # as text (sentencepiece does), so its ids equal sentencepiece's.
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                       "legacy": True, "add_prefix_space": False, "split_special_tokens": True}, f)
        tok = AutoTokenizer.from_pretrained(tmp)
        tok.save_pretrained(str(out))
    shutil.copyfile(model_path, out / "tokenizer.model")


def export_hf(checkpoint: str, out: str | os.PathLike, *, step: int | None = None, flavor: str | None = None,
              tokenizer: str | None = None, dtype: str = "float32", max_shard_size: str = "5GB",
              overwrite: bool = False) -> dict:
    """Write a Hugging Face Llama folder for a titan_rw checkpoint; returns what was written."""
    from titan_rw.data.tokenizer import SentencePieceTokenizer
    from titan_rw.data import DEFAULT_TOKENIZER
    from titan_rw.eval.adapter import checkpoint_shapes, infer_flavor, read_run_config
    from titan_rw.models import FLAVORS, model_spec

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    out = Path(out).expanduser().resolve()
    if out.is_dir() and any(out.glob("*.safetensors")) and not overwrite:
        raise ExportError(f"{out} already holds a model (*.safetensors); pass --overwrite or another --hf folder")
    ck = _resolve(checkpoint, step)
    run_cfg = read_run_config(ck.run_dir)
    if flavor is None:
        flavor = run_cfg.get("model", {}).get("flavor")
    if flavor is None and ck.kind == "dcp":
        flavor = infer_flavor(checkpoint_shapes(ck))
    if flavor not in FLAVORS:
        raise ExportError(f"{ck.path}: cannot tell the model flavor (no run_config.toml beside the checkpoint); "
                          f"pass --flavor, one of {', '.join(FLAVORS)}")
    tok_path = tokenizer or run_cfg.get("data", {}).get("tokenizer")
    if tok_path is None:
        if FLAVORS[flavor].vocab_size != 2048:
            raise ExportError(f"flavor {flavor} has a {FLAVORS[flavor].vocab_size}-token vocabulary: pass its "
                              f"sentencepiece model with --tokenizer")
        tok_path = str(DEFAULT_TOKENIZER)
    tok = SentencePieceTokenizer(tokenizer_path=str(tok_path))
    if tok.get_vocab_size() > FLAVORS[flavor].vocab_size:
        raise ExportError(f"tokenizer {tok.model_path} has {tok.get_vocab_size()} pieces, more than flavor {flavor}'s "
                          f"vocabulary {FLAVORS[flavor].vocab_size}")

    sd = read_model_state(ck, flavor)
    torch_dtype = _torch_dtype(dtype)
    sd = {k: v.to(torch_dtype) for k, v in sd.items()}
    cfg, _ = _meta_state_dict(flavor)
    adapter = model_spec(flavor).state_dict_adapter(cfg, None)
    hf_sd = {k: v.contiguous() for k, v in adapter.to_hf(sd).items()}

    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()  # an earlier export with another sharding must not leave stale shards behind
    save_torch_state_dict(hf_sd, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    for f in out.glob("*.safetensors"):  # written through a private temp file: give them the usual mode
        os.chmod(f, 0o666 & ~umask)
    hf_cfg = hf_llama_config(flavor, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, dtype=dtype)
    hf_cfg.save_pretrained(str(out))
    GenerationConfig.from_model_config(hf_cfg).save_pretrained(str(out))
    _save_tokenizer(tok.model_path, out)
    info = {"checkpoint": str(ck.path), "kind": ck.kind, "step": ck.step, "flavor": flavor, "dtype": dtype,
            "tokenizer": tok.model_path, "tokenizer_sha256": tok.sha256,
            "parameters": sum(v.numel() for v in hf_sd.values())}
    with open(out / "titan_rw_export.json", "w") as f:
        json.dump(info, f, indent=2)
    return {**info, "out": str(out), "files": sorted(p.name for p in out.iterdir())}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titan-rw export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder, DCP step-N folder, consolidated .pt/.safetensors, or an HF folder")
    p.add_argument("--hf", required=True, metavar="OUT", help="folder to write the Hugging Face model into")
    p.add_argument("--step", type=int, default=None, help="checkpoint step in a run folder (default: latest)")
    p.add_argument("--flavor", default=None, help="model flavor, if the run folder has no run_config.toml")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model, if the run folder has no run_config.toml")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights (default float32)")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    return p


def export_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from titan_rw.eval.adapter import CheckpointError

    try:
        info = export_hf(args.checkpoint, args.hf, step=args.step, flavor=args.flavor, tokenizer=args.tokenizer,
                         dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (ExportError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"titan-rw export: {e}", file=sys.stderr)
        return 2
    print(f"titan-rw export: {info['flavor']} from {info['checkpoint']} (step {info['step']}), "
          f"{info['parameters']:,} parameters in {info['dtype']} -> {info['out']}")
    print(f"  load it: transformers.AutoModelForCausalLM.from_pretrained({info['out']!r})")
    print(f"  evaluate it: titan-rw-lm-eval --model hf --model_args pretrained={info['out']} --tasks ...")
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
