"""Llama flavors of the paper on TorchTitan's llama3 model: `tiny`, `debug`, `1.4B`, `7B`.

The 1.4B and 7B shapes are the paper's (Table 6/7) and IBM fms-fsdp's: multi-head attention
(n_kv_heads = n_heads), SwiGLU FFN with hidden = 8/3·dim rounded up to a multiple of 256,
RoPE θ = 10000 without scaling, untied embeddings, vocabulary 32000, up to 8192 tokens.
`debug` (and the even smaller `tiny`, for tests) keep the vocabulary of the shipped
2048-piece sentencepiece tokenizer.

Attention is document-causal on every device: a token attends to the earlier tokens of its own
document only (the loader packs several documents per row and restarts `positions` at 0 at each).
Where CUDA is present it is TorchTitan's default, FlexAttention with a block mask; on CPU, where
FlexAttention has no backward (compat patch 4), it is SDPA with a boolean mask
(`DocumentCausalSDPA`). Both masks come from one definition, `document_mask_mods(positions)`
(TorchTitan's causal and packed-document mask_mods): FlexAttention evaluates it block-wise, the CPU
path evaluates it densely once per forward (`document_causal_mask`), not once per layer.
A forward without `positions` (lm-eval, one document per row) is plain causal attention.
"""

from __future__ import annotations

import titan_rw  # noqa: F401  (compat patches before torchtitan)

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import and_masks

from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
from torchtitan.models.common.attention import (
    FlexAttention,
    ScaledDotProductAttention,
    VarlenAttention,
    get_causal_mask_mod,
    get_efficient_causal_mask_mod_for_packed_document,
)
from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers, parallelize_llama
from torchtitan.models.llama3 import _EMBEDDING_INIT, _NORM_INIT, _output_linear_init
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.model_spec import ModelSpec

from titan_rw import compat


@dataclass(frozen=True)
class Flavor:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    max_seq_len: int
    multiple_of: int = 256
    rope_theta: float = 10000.0

    @property
    def ffn_hidden(self) -> int:
        return compute_ffn_hidden_dim(self.dim, multiple_of=self.multiple_of)

    def num_params(self) -> int:
        """Exact parameter count (untied embeddings, RMSNorm weights, no biases)."""
        d, h, v, n = self.dim, self.ffn_hidden, self.vocab_size, self.n_layers
        per_layer = 4 * d * d + 3 * d * h + 2 * d
        return n * per_layer + 2 * v * d + d


FLAVORS: dict[str, Flavor] = {
    "tiny": Flavor(dim=64, n_layers=2, n_heads=4, vocab_size=2048, max_seq_len=2048, multiple_of=64),
    "debug": Flavor(dim=256, n_layers=4, n_heads=8, vocab_size=2048, max_seq_len=2048),
    "1.4B": Flavor(dim=2048, n_layers=24, n_heads=16, vocab_size=32000, max_seq_len=8192),
    "7B": Flavor(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=8192),
}


# ----------------------------------------------------------------------------- attention
def document_mask_mods(positions: torch.Tensor) -> list:
    """The document-causal mask of packed rows as FlexAttention mask_mods (ANDed): causal, and the
    key in the query's document. A document starts where `positions` [B, L] is 0. These are the
    mask_mods TorchTitan's Decoder builds its FlexAttention block mask from; `Llama` uses this one
    function for the GPU block mask and the CPU dense mask alike."""
    return [get_causal_mask_mod(), get_efficient_causal_mask_mod_for_packed_document(positions)]


def document_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """`document_mask_mods(positions)` evaluated on the whole (query, key) grid: bool [B, 1, L, L],
    True where the query may attend to the key (SDPA's `attn_mask`). Device ops only."""
    B, L = positions.shape
    idx = torch.arange(L, device=positions.device)
    b = torch.arange(B, device=positions.device).view(B, 1, 1)
    h = torch.zeros((), dtype=torch.long, device=positions.device)
    mask = and_masks(*document_mask_mods(positions))(b, h, idx.view(1, L, 1), idx.view(1, 1, L))
    return mask.expand(B, L, L).unsqueeze(1)


class DocumentCausalSDPA(ScaledDotProductAttention):
    """TorchTitan's SDPA inner attention, taking `document_causal_mask` as `attention_masks`
    (plain causal when none is given). FlexAttention's stand-in where it cannot run backward."""

    @dataclass(kw_only=True, slots=True)
    class Config(ScaledDotProductAttention.Config):
        pass

    # flash attention takes no mask on CUDA: memory-efficient attention before the math kernel
    sdpa_backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                     SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def forward(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks=None, scale=None, enable_gqa=False, **kwargs):
        if attention_masks is None:
            return super().forward(q_BLNH, k_BLNH, v_BLNH, scale=scale, enable_gqa=enable_gqa, is_causal=True)
        if not isinstance(attention_masks, torch.Tensor) or attention_masks.dtype != torch.bool:
            raise TypeError(f"DocumentCausalSDPA takes a boolean mask (document_causal_mask), got {type(attention_masks).__name__}")
        q, k, v = (t.transpose(1, 2) for t in (q_BLNH, k_BLNH, v_BLNH))
        with sdpa_kernel(self.sdpa_backends, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_masks, scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)


class Llama(Llama3Model):
    """TorchTitan's Llama3Model whose attention masks all come from `document_mask_mods`, and which
    builds them itself (once per forward) when a caller passes no masks (TorchTitan's trainer
    builds FlexAttention's; the CPU mask and direct callers such as the experiments and lm-eval
    rely on this)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Llama3Model.Config):
        pass

    def _create_flex_attention_mask_for_document(self, positions, attn_config):
        return self._create_flex_attention_mask(positions, attn_config, document_mask_mods(positions))

    def get_attention_masks(self, positions: torch.Tensor):
        inner = getattr(self.config.first_attention, "inner_attention", None)
        if isinstance(inner, DocumentCausalSDPA.Config):
            return document_causal_mask(positions)
        return Llama3Model.get_attention_masks(self, positions)

    def forward(self, tokens, positions=None, attention_masks=None):
        if attention_masks is None:
            inner = getattr(self.config.first_attention, "inner_attention", None)
            if positions is not None and isinstance(inner, DocumentCausalSDPA.Config):
                attention_masks = self.get_attention_masks(positions)
            elif isinstance(inner, (FlexAttention.Config, VarlenAttention.Config)):
                # FlexAttention/varlen always need a mask; without positions a row is one document
                B, L = tokens.shape[:2]
                doc_positions = torch.arange(L, device=tokens.device).expand(B, L) if positions is None else positions
                attention_masks = self.get_attention_masks(doc_positions)
        return Llama3Model.forward(self, tokens, positions, attention_masks)


def flavor(name: str) -> Flavor:
    if name not in FLAVORS:
        raise ValueError(f"unknown model flavor {name!r}; valid: {', '.join(FLAVORS)}")
    return FLAVORS[name]


def model_config(name: str, attn_backend: str | None = None) -> Llama.Config:
    """The `Llama.Config` (TorchTitan's Llama3Model.Config) of a flavor. `attn_backend`: "sdpa"
    (document-causal SDPA), "flex", "flex_flash", "varlen", or None for the machine's default
    (compat patch 4)."""
    f = flavor(name)
    backend = attn_backend or compat.attention_backend() or "flex"
    layers = _build_llama3_layers(
        fuse_qkv=True,
        n_layers=f.n_layers,
        dim=f.dim,
        n_heads=f.n_heads,
        n_kv_heads=f.n_heads,
        hidden_dim=f.ffn_hidden,
        rope=ComplexRoPE.Config(dim=f.dim // f.n_heads, max_seq_len=f.max_seq_len, theta=f.rope_theta),
        attn_backend="flex" if backend == "sdpa" else backend,
    )
    if backend == "sdpa":  # TorchTitan refuses "sdpa" for LMs by name; build it directly
        for layer in layers:
            layer.attention.inner_attention = DocumentCausalSDPA.Config()
    return Llama.Config(
        dim=f.dim,
        vocab_size=f.vocab_size,
        tok_embeddings=Embedding.Config(num_embeddings=f.vocab_size, embedding_dim=f.dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=f.dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=f.dim, out_features=f.vocab_size, param_init=_output_linear_init(f.dim)),
        layers=layers,
    )


def model_spec(name: str, attn_backend: str | None = None) -> ModelSpec:
    """A fresh ModelSpec (TorchTitan mutates the model config in `update_from_config`)."""
    return ModelSpec(
        name="llama",
        flavor=name,
        model=model_config(name, attn_backend),
        parallelize_fn=parallelize_llama,
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=None,
        state_dict_adapter=LlamaStateDictAdapter,
    )


class LlamaStateDictAdapter(Llama3StateDictAdapter):
    """TorchTitan's Llama 3 adapter (our parameter names are its own) ⇄ Hugging Face `LlamaForCausalLM`,
    used by `checkpoint.last_save_in_hf`, `checkpoint.initial_load_in_hf` and `titan-rw export`.

    TorchTitan passes `hf_assets_path`, which here is `[data] tokenizer`: only a folder is an HF
    assets folder (its `model.safetensors.index.json` decides the output sharding, and
    `initial_load_in_hf` without `initial_load_path` loads its weights); a sentencepiece file is not.
    """

    def __init__(self, model_config, hf_assets_path: str | None):
        folder = hf_assets_path if hf_assets_path and os.path.isdir(hf_assets_path) else None
        if folder and not os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
            folder_has_weights = any(n.endswith(".safetensors") for n in os.listdir(folder))
            if not folder_has_weights:
                folder = None  # a tokenizer folder: nothing to read, one output file
        super().__init__(model_config, folder)


def describe(name: str) -> str:
    f = flavor(name)
    return (
        f"llama {name}: dim {f.dim}, {f.n_layers} layers, {f.n_heads} heads, ffn {f.ffn_hidden}, "
        f"vocab {f.vocab_size}, max seq {f.max_seq_len}, {f.num_params():,} parameters "
        f"({f.num_params() / 1e9:.2f}B)"
    )


@torch.no_grad()
def portable_init(model: torch.nn.Module, model_config, seed: int) -> None:
    """Initial weights that do not depend on the world size or the sharding (DTensor's sharded RNG
    does): rank 0 builds one full model on CPU from `model_config` with `seed`, initializes it, and
    its values are distributed into `model`'s (possibly FSDP-sharded, AC- or compile-wrapped)
    parameters. Rank 0 holds one full fp32 copy on CPU for a moment."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    on = dist.is_initialized() and dist.get_world_size() > 1
    rank0 = not on or dist.get_rank() == 0
    sd: dict[str, torch.Tensor] = {}
    if rank0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device("cpu"):
                plain = model_config.build()
            plain.init_weights(buffer_device=None)
        sd = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        # activation checkpointing and per-block compile wrap modules and rename their parameters
        plain_name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        full = sd[plain_name].detach() if rank0 else None
        if isinstance(p, DTensor):
            if full is None:
                full = torch.empty(p.shape, dtype=p.dtype)
            local = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=0)
            p.to_local().copy_(local.to_local())
        else:
            if full is None:
                full = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            full = full.to(p.device, p.dtype)
            if on:
                dist.broadcast(full, src=0)
            p.copy_(full)
