"""Llama flavors: the paper's shapes and parameter counts, SDPA on CPU, a forward pass."""

import pytest
import torch

from titan_rw import compat, models
from torchtitan.models.common.attention import ScaledDotProductAttention


@pytest.mark.parametrize("name,expected", [("1.4B", 1_364_297_728), ("7B", 6_738_415_616)])
def test_paper_sizes(name, expected):
    f = models.flavor(name)
    assert f.num_params() == expected
    with torch.device("meta"):
        m = models.model_config(name).build()
    assert sum(p.numel() for p in m.parameters()) == expected
    assert f.vocab_size == 32000 and f.max_seq_len == 8192
    assert f.n_heads == (16 if name == "1.4B" else 32) and f.dim == (2048 if name == "1.4B" else 4096)
    assert f.n_layers == (24 if name == "1.4B" else 32)
    assert models.describe(name).startswith(f"llama {name}:")


def test_debug_forward_sdpa_on_cpu():
    if compat.attention_backend() != "sdpa":
        pytest.skip("CUDA present: TorchTitan's default attention")
    cfg = models.model_config("debug")
    assert all(isinstance(layer.attention.inner_attention, ScaledDotProductAttention.Config) for layer in cfg.layers)
    assert models.flavor("debug").vocab_size == 2048
    torch.manual_seed(0)
    m = cfg.build()
    m.init_weights(buffer_device=None)
    x = torch.randint(0, 2048, (2, 16))
    out = m(x)
    assert out.shape == (2, 16, 2048) and torch.isfinite(out).all()
    # causal: the first position does not see later tokens
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 2048
    assert torch.allclose(m(y)[:, :8], out[:, :8], atol=1e-5)
    assert sum(p.numel() for p in m.parameters()) == models.flavor("debug").num_params()


def test_unknown_flavor():
    with pytest.raises(ValueError, match="valid: tiny, debug, 1.4B, 7B"):
        models.flavor("3B")


def test_model_spec_is_fresh():
    a, b = models.model_spec("tiny"), models.model_spec("tiny")
    assert a.model is not b.model and a.flavor == "tiny" and a.parallelize_fn is b.parallelize_fn
