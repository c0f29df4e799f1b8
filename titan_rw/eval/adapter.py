"""lm-evaluation-harness model `titan_rw`: any titan_rw checkpoint, its sentencepiece tokenizer.

    lm_eval --model titan_rw --model_args checkpoint=RUN_DIR_OR_STEP_DIR[,flavor=1.4B,tokenizer=...] ...
    titan-rw eval RUN_DIR --tasks paper

What it loads
-------------
`checkpoint` is one of
- a run folder (`job.dump_folder`): its latest `<checkpoint.folder>/step-N` (or `step=N`);
- a DCP step folder `.../step-N` written by TorchTitan's CheckpointManager: a full training
  checkpoint (model + optimizer + dataloader + ...) or a model-only one; only the model's tensors
  are read (DCP reads just the keys asked for);
- a consolidated file: `torch.save` of a state dict (`.pt`/`.pth`/`.bin`, e.g. from
  `torch.distributed.checkpoint.format_utils.dcp_to_torch_save`), or `.safetensors`.
Model keys are TorchTitan's canonical ones (`layers.0.attention.qkv_linear.wq.weight`, ...).

The flavor and tokenizer come from, in order: `flavor=` / `tokenizer=` model args; the run's saved
config (`run_config.toml` / `config.json`, which the trainer writes in the run folder: `[model] flavor`, `[data] tokenizer`, `[training] seq_len`);
the checkpoint's tensor shapes matched against `titan_rw.models.FLAVORS` (and the shipped tokenizer
when the vocabulary is its 2048).

How it scores
-------------
The model runs with causal SDPA attention (one document per row, positions 0..T-1, as in
training where each document starts with BOS) and `_skip_lm_head=True`; the output projection is
applied only to the rows being scored, in chunks, with log-softmax in float32 — the same per-token
NLL as `titan_rw.loss.per_sample_loss`. Contexts start with BOS (the trainer's documents do).
`loglikelihood_rolling` uses windows of `max_length` (default: the run's `training.seq_len`, else
the flavor's maximum) with lm-eval's rolling-window rule (each token predicted once, maximal
context). `generate_until` is greedy (no KV cache: each new token re-runs the batch), stops at
any `until` string, at EOS, or after `max_gen_toks`.
"""

from __future__ import annotations

import titan_rw  # noqa: F401  (compat patches before torchtitan)

import json
import logging
import os
import re
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
import lm_eval.models  # noqa: F401  (lm-eval lists its own models only while its registry is empty: first)
from lm_eval.api.registry import register_model

logger = logging.getLogger("titan_rw.eval")

CONFIG_NAMES = ("run_config.toml", "config.json", "config.toml")  # what the trainer saves in the run folder
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint path that cannot be evaluated, with what to do about it."""


# ----------------------------------------------------------------------------- locating
@dataclass
class ResolvedCheckpoint:
    path: Path  # DCP step dir or a consolidated file
    kind: str  # "dcp" | "torch" | "safetensors"
    run_dir: Path | None  # where a saved config may live
    step: int | None


def _step_of(p: Path) -> int | None:
    m = re.fullmatch(r"step-(\d+)", p.name)
    return int(m.group(1)) if m else None


def _dcp_steps(run_dir: Path) -> list[Path]:
    """step-N folders with DCP metadata, one or two levels under run_dir."""
    found = []
    for cand in list(run_dir.glob("step-*")) + list(run_dir.glob("*/step-*")):
        if cand.is_dir() and _step_of(cand) is not None and (cand / ".metadata").is_file():
            found.append(cand)
    return sorted(found, key=lambda p: (_step_of(p), str(p)))


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> ResolvedCheckpoint:
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    if p.is_file():
        if p.suffix == ".safetensors":
            return ResolvedCheckpoint(p, "safetensors", p.parent, None)
        if p.suffix in TORCH_SUFFIXES:
            return ResolvedCheckpoint(p, "torch", p.parent, None)
        raise CheckpointError(f"{p}: unknown checkpoint file type (expected a DCP step-N folder, {', '.join(TORCH_SUFFIXES)} or .safetensors)")
    if (p / ".metadata").is_file():  # a DCP step folder
        run_dir = p.parent.parent if _step_of(p) is not None else p.parent
        return ResolvedCheckpoint(p, "dcp", run_dir, _step_of(p))
    steps = _dcp_steps(p)
    if steps:
        if step is not None:
            chosen = [s for s in steps if _step_of(s) == int(step)]
            if not chosen:
                raise CheckpointError(f"{p}: no checkpoint step-{step}; found steps {[_step_of(s) for s in steps]}")
            s = chosen[-1]
        else:
            s = steps[-1]
        return ResolvedCheckpoint(s, "dcp", p, _step_of(s))
    for name in ("model.safetensors", "model.pt", "consolidated.pt", "model.pth"):
        if (p / name).is_file():
            return resolve_checkpoint(p / name)
    raise CheckpointError(
        f"{p}: no checkpoint found (looked for DCP step-N/.metadata folders under it and "
        f"model.safetensors / model.pt). Train with --checkpoint.enable true, or pass a step-N folder."
    )


def read_run_config(run_dir: Path | None) -> dict[str, dict[str, Any]]:
    """The run's saved TOML config ({section: {key: value}}), {} when none was saved."""
    if run_dir is None:
        return {}
    for d in (run_dir, run_dir.parent):
        for name in CONFIG_NAMES:
            f = d / name
            if f.is_file():
                try:
                    with open(f, "rb") as fh:
                        return json.load(fh) if f.suffix == ".json" else tomllib.load(fh)
                except (tomllib.TOMLDecodeError, ValueError) as e:
                    logger.warning(f"{f}: not readable, ignored ({e})")
    return {}


# ----------------------------------------------------------------------------- shapes / flavor
def checkpoint_shapes(ck: ResolvedCheckpoint) -> dict[str, tuple[int, ...]]:
    """Model tensor shapes stored in a checkpoint (without reading the data)."""
    if ck.kind == "dcp":
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(str(ck.path)).read_metadata()
        return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
    sd = load_consolidated(ck)
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def infer_flavor(shapes: dict[str, tuple[int, ...]]) -> str | None:
    from titan_rw.models import FLAVORS

    emb = shapes.get("tok_embeddings.weight")
    if emb is None:
        return None
    vocab, dim = emb
    n_layers = len({k.split(".")[1] for k in shapes if k.startswith("layers.") and k.endswith("attention_norm.weight")})
    ffn = shapes.get("layers.0.feed_forward.w1.weight", (None,))[0]
    for name, f in FLAVORS.items():
        if (f.vocab_size, f.dim, f.n_layers, f.ffn_hidden) == (vocab, dim, n_layers, ffn):
            return name
    return None


def load_consolidated(ck: ResolvedCheckpoint) -> dict[str, torch.Tensor]:
    if ck.kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover
            raise CheckpointError(f"{ck.path}: reading .safetensors needs the `safetensors` package") from e
        sd = load_file(str(ck.path))
    else:
        sd = torch.load(str(ck.path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return sd


# ----------------------------------------------------------------------------- building
def build_model(flavor: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An uninitialized-parameter model of `flavor` on `device` (RoPE buffers computed), causal SDPA."""
    from titan_rw.models import model_config

    cfg = model_config(flavor, attn_backend="sdpa")
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device=device)
    for m in model.modules():
        init_buffers = getattr(m, "_init_self_buffers", None)
        if init_buffers is not None:
            init_buffers(buffer_device=torch.device(device))
    if dtype != torch.float32:
        for prm in model.parameters():
            prm.data = prm.data.to(dtype)
    return model


def load_weights(model: torch.nn.Module, ck: ResolvedCheckpoint) -> None:
    """Load a checkpoint's model tensors into `model` (any of the checkpoint kinds)."""
    from torchtitan.components.checkpoint import ModelWrapper

    wrapper = ModelWrapper(model)
    sd = wrapper.state_dict()  # canonical keys (hooks split the fused qkv)
    if ck.kind == "dcp":
        import torch.distributed.checkpoint as dcp

        stored = checkpoint_shapes(ck)
        missing = sorted(k for k in sd if k not in stored)
        if missing:
            raise CheckpointError(f"{ck.path}: checkpoint lacks model tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": a single-process load is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, checkpoint_id=str(ck.path), no_dist=True)
        wrapper.load_state_dict(sd)
    else:
        stored = load_consolidated(ck)
        missing = sorted(k for k in sd if k not in stored)
        if missing:
            raise CheckpointError(f"{ck.path}: checkpoint lacks model tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for k, v in sd.items():
            v.copy_(stored[k].to(v.dtype))
        wrapper.load_state_dict(sd)


def _dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype {name!r}: use one of {', '.join(table)} or auto")
    return table[name]


# ----------------------------------------------------------------------------- the LM
@register_model("titan_rw")
class TitanRWLM(TemplateLM):
    """lm-eval LM over a titan_rw Llama (see the module docstring)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        pretrained: str | None = None,  # lm-eval's usual name for the same thing
        flavor: str | None = None,
        tokenizer: Any = None,
        step: int | str | None = None,
        max_length: int | str | None = None,
        batch_size: int | str | None = 8,
        max_batch_size: int | str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype = "auto",
        max_gen_toks: int | str = 256,
        model: torch.nn.Module | None = None,
        logit_chunk: int = 4096,
        **kwargs,
    ):
        super().__init__()
        from titan_rw.data import DEFAULT_TOKENIZER
        from titan_rw.data.tokenizer import SentencePieceTokenizer
        from titan_rw.models import FLAVORS

        if kwargs:
            logger.info(f"titan_rw: ignoring model args {sorted(kwargs)}")
        self.batch_size_per_gpu = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.logit_chunk = int(logit_chunk)
        run_cfg: dict = {}
        path = checkpoint or pretrained
        if model is not None:  # an in-memory model (periodic evaluation during training)
            self.model = model
            self._device = next(model.parameters()).device if device is None else torch.device(device)
            self.checkpoint = None
        else:
            if path is None:
                raise CheckpointError("titan_rw: pass checkpoint=RUN_DIR|STEP_DIR|FILE in --model_args")
            ck = resolve_checkpoint(path, step=step)
            run_cfg = read_run_config(ck.run_dir)
            flavor = flavor or run_cfg.get("model", {}).get("flavor") or infer_flavor(checkpoint_shapes(ck))
            if flavor is None or flavor not in FLAVORS:
                raise CheckpointError(
                    f"{ck.path}: cannot tell the model flavor (no run_config.toml in the run folder and the tensor "
                    f"shapes match none of {', '.join(FLAVORS)}); pass --model_args flavor=NAME"
                )
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.model = build_model(flavor, self._device, _dtype(dtype, self._device))
            load_weights(self.model, ck)
            self.checkpoint = ck
            logger.info(f"titan_rw: loaded {flavor} from {ck.path} ({ck.kind}, step {ck.step}) on {self._device}")
        self.model.eval()
        self.flavor = flavor
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tok_path = tokenizer or run_cfg.get("data", {}).get("tokenizer")
            if tok_path is None:
                vocab = FLAVORS[flavor].vocab_size if flavor in FLAVORS else None
                if vocab is not None and vocab != 2048:
                    raise CheckpointError(
                        f"flavor {flavor} has a {vocab}-token vocabulary: pass its sentencepiece model as "
                        f"--model_args tokenizer=/path/to/tokenizer.model (the run folder has no run_config.toml)"
                    )
                tok_path = DEFAULT_TOKENIZER
            self.tok = SentencePieceTokenizer(tokenizer_path=str(tok_path))
        else:
            self.tok = tokenizer
        if max_length is None:
            max_length = run_cfg.get("training", {}).get("seq_len")
        if max_length is None:
            max_length = FLAVORS[flavor].max_seq_len if flavor in FLAVORS else 2048
        self._max_length = int(max_length)
        if flavor in FLAVORS and self._max_length > FLAVORS[flavor].max_seq_len:
            raise ValueError(f"max_length {self._max_length} exceeds flavor {flavor}'s {FLAVORS[flavor].max_seq_len}")
        self.lm_head = self.model.lm_head
        self.vocab_size = self.tok.get_vocab_size()

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "model_path", "titan_rw")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs) -> list[int]:
        ids = self.tok.encode(string, add_bos=add_special_tokens is not False, add_eos=False)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # ------------------------------------------------------------------ model calls
    def _hidden(self, rows: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Right-padded batch → final hidden states [B, T, D] (lm_head not applied)."""
        lens = [len(r) for r in rows]
        t = max(lens)
        pad = self.prefix_token_id
        x = torch.full((len(rows), t), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        skip = getattr(self.model, "_skip_lm_head", False)
        self.model._skip_lm_head = True
        try:
            h = self.model(x.to(self._device))
        finally:
            self.model._skip_lm_head = skip
        return h, lens

    def _score_rows(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row log p(target) and greedy-match flags for hidden rows [N, D]; float32 log-softmax."""
        logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        greedy = torch.empty(h.shape[0], dtype=torch.bool, device=h.device)
        for s in range(0, h.shape[0], self.logit_chunk):
            logits = self.lm_head(h[s : s + self.logit_chunk]).float()
            lse = torch.logsumexp(logits, dim=-1)
            tgt = targets[s : s + self.logit_chunk]
            logp[s : s + self.logit_chunk] = logits.gather(1, tgt[:, None]).squeeze(1) - lse
            greedy[s : s + self.logit_chunk] = logits.argmax(dim=-1) == tgt
        return logp, greedy

    @torch.no_grad()
    def token_logprobs(self, context: list[int], continuation: list[int]) -> torch.Tensor:
        """log p of each continuation token given context (one request, for tests and tools)."""
        [(lp, _)] = self._score_batch([(context, continuation)], per_token=True)
        return lp

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]], per_token: bool = False):
        rows, spans = [], []
        for ctx, cont in pairs:
            full = (list(ctx) + list(cont))[-(self._max_length + 1):]
            inp = full[:-1]
            n = min(len(cont), len(inp))
            rows.append(inp)
            spans.append((len(inp) - n, len(inp), full[len(full) - n:]))
        h, _ = self._hidden(rows)
        sel_h, sel_t, owners = [], [], []
        for i, (a, b, tgt) in enumerate(spans):
            sel_h.append(h[i, a:b])
            sel_t.extend(tgt)
            owners.append(b - a)
        logp, greedy = self._score_rows(torch.cat(sel_h), torch.tensor(sel_t, dtype=torch.long, device=h.device))
        out, o = [], 0
        for n in owners:
            lp, g = logp[o : o + n], greedy[o : o + n]
            out.append((lp.cpu(), bool(g.all())) if per_token else (float(lp.double().sum()), bool(g.all())))
            o += n
        return out

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None, **kwargs):
        from tqdm import tqdm

        bs = override_bs or self.batch_size
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="titan_rw loglikelihood")
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            scored = self._score_batch([(requests[i][1], requests[i][2]) for i in idx])
            for i, r in zip(idx, scored):
                results[i] = r
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, r)
            bar.update(len(idx))
        bar.close()
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils as lm_utils

        windows, owner = [], []
        for k, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores):
            totals[k] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        out: list[str | None] = [None] * len(requests)
        prepared = []
        for k, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_gen = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if gen_kwargs.get("do_sample"):
                logger.warning("titan_rw: do_sample is not supported; decoding greedily")
            max_gen = max(1, min(max_gen, self._max_length - 1))
            ctx = self.tok_encode(context)[-(self._max_length - max_gen):]
            prepared.append((k, ctx, until, max_gen))
        prepared.sort(key=lambda p: -len(p[1]))
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="titan_rw generate")
        for s in range(0, len(prepared), self.batch_size):
            batch = prepared[s : s + self.batch_size]
            for (k, _, until, _), text in zip(batch, self._greedy(batch)):
                out[k] = text
                self.cache_hook.add_partial("generate_until", requests[k].args, text)
            bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def _greedy(self, batch) -> list[str]:
        rows = [list(ctx) for _, ctx, _, _ in batch]
        start = [len(r) for r in rows]
        done = [False] * len(rows)
        texts = [""] * len(rows)
        eos = self.eot_token_id
        for _ in range(max(b[3] for b in batch)):
            live = [i for i in range(len(rows)) if not done[i]]
            if not live:
                break
            h, lens = self._hidden([rows[i] for i in live])
            last = torch.stack([h[j, lens[j] - 1] for j in range(len(live))])
            nxt = self.lm_head(last).float().argmax(dim=-1).tolist()
            for j, i in enumerate(live):
                _, _, until, max_gen = batch[i]
                if nxt[j] == eos:
                    done[i] = True
                    continue
                rows[i].append(nxt[j])
                texts[i] = self.tok_decode(rows[i][start[i]:])
                if any(u and u in texts[i] for u in until) or len(rows[i]) - start[i] >= max_gen:
                    done[i] = True
        for i, (_, _, until, _) in enumerate(batch):
            for u in until:
                if u and u in texts[i]:
                    texts[i] = texts[i].split(u, 1)[0]
        return texts
