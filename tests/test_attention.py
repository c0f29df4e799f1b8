"""Document-causal attention on every device: a CPU run trains the model a GPU run trains.

The loader packs several documents per row and restarts `positions` at 0 at each. A token must
attend to the earlier tokens of its own document only: FlexAttention's block mask on GPU, SDPA with
a boolean mask on CPU, both from `titan_rw.models.document_mask_mods`.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from titan_rw import models
from titan_rw.loss import IGNORE_INDEX, per_sample_loss
from torchtitan.models.common.attention import ScaledDotProductAttention

V = 2048


def _positions(*lengths):
    """One row's positions for documents of these lengths (restarting at 0 at each)."""
    return torch.cat([torch.arange(n) for n in lengths])


def _reference_mask(positions):
    """Independent definition: same document (a document starts where the position is 0) and causal."""
    doc = torch.cumsum((positions == 0).long(), dim=1)
    i = torch.arange(positions.shape[1])
    return (doc[:, :, None] == doc[:, None, :]) & (i[:, None] >= i[None, :])


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = models.model_config("tiny", attn_backend="sdpa").build()
    m.init_weights(buffer_device=None)
    return m.eval()


@pytest.mark.parametrize("rows", [
    [(40,)],                        # one document: plain causal
    [(7, 20, 13)],                  # batch of one (TorchTitan's batch-1 mask_mod)
    [(7, 20, 13), (40,), (1, 1, 38), (39, 1)],  # batch > 1, one-token documents at both ends
])
def test_dense_mask_is_same_document_and_causal(rows):
    pos = torch.stack([_positions(*r) for r in rows])
    mask = models.document_causal_mask(pos)
    assert mask.shape == (len(rows), 1, 40, 40) and mask.dtype == torch.bool
    assert torch.equal(mask[:, 0], _reference_mask(pos))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_cpu_model_equals_the_flexattention_model_of_the_gpu_path(monkeypatch):
    """The GPU model (attn_backend "flex": TorchTitan's Decoder builds a FlexAttention BlockMask from
    `document_mask_mods`) and the CPU model compute the same outputs on packed rows. FlexAttention's
    forward runs on CPU uncompiled (its backward does not, hence SDPA for training)."""
    import torchtitan.models.common.decoder as decoder
    from torchtitan.models.common.attention import FlexAttention

    # TorchTitan compiles create_block_mask and flex_attention; the eager ones compute the same on CPU
    monkeypatch.setattr(decoder, "create_attention_mask", create_block_mask)
    monkeypatch.setattr(FlexAttention, "_compiled_flex_attn", flex_attention)
    cpu = _tiny(seed=2)
    gpu = models.model_config("tiny", attn_backend="flex").build()
    gpu.load_state_dict(cpu.state_dict())
    gpu.eval()
    x = torch.randint(0, V, (3, 128))
    pos = torch.stack([_positions(30, 50, 48), torch.arange(128), _positions(100, 1, 27)])
    with torch.no_grad():
        assert (gpu(x, positions=pos) - cpu(x, positions=pos)).abs().max() < 1e-5
        assert (gpu(x[:1], positions=pos[:1]) - cpu(x[:1], positions=pos[:1])).abs().max() < 1e-5  # batch of one
        assert (gpu(x) - cpu(x)).abs().max() < 1e-5  # no positions: one document per row, both
        # the mask matters: the packed rows differ from plain causal attention
        assert (cpu(x, positions=pos) - cpu(x, positions=torch.arange(128).expand(3, 128)))[0].abs().max() > 1e-2


def test_outputs_of_a_document_do_not_depend_on_the_other_documents_of_its_row():
    m = _tiny()
    pos = _positions(12, 20, 16).unsqueeze(0)
    x = torch.randint(0, V, (1, 48))
    y = x.clone()
    y[0, :12] = (y[0, :12] + 7) % V      # change document A
    y[0, 32:] = (y[0, 32:] + 11) % V     # and document C
    with torch.no_grad():
        ox, oy = m(x, positions=pos), m(y, positions=pos)
    assert torch.allclose(ox[0, 12:32], oy[0, 12:32], atol=1e-6, rtol=0)  # document B: unchanged
    assert (ox[0, :12] - oy[0, :12]).abs().max() > 1e-2                  # the changes are real
    # B alone in its own row gives B's outputs
    with torch.no_grad():
        alone = m(x[:, 12:32], positions=pos[:, 12:32])
    assert torch.allclose(alone[0], ox[0, 12:32], atol=1e-5, rtol=0)


def test_per_sample_loss_of_a_packed_row_is_the_token_weighted_loss_of_its_documents():
    m = _tiny(seed=3)
    lengths = (9, 23, 14, 18)
    L = sum(lengths)
    x = torch.randint(0, V, (2, L))
    labels = torch.randint(0, V, (2, L))
    labels[1, -5:] = IGNORE_INDEX  # a padded tail, as the loader's last row
    pos = torch.stack([_positions(*lengths), torch.arange(L)])
    m._skip_lm_head = True  # the trainer's path: hidden states, then the chunked per-sample loss
    with torch.no_grad():
        losses, n_valid = per_sample_loss(m.lm_head, m(x, positions=pos), labels, num_chunks=4)
    m._skip_lm_head = False
    # reference: every document of row 0 as its own row, full logits, plain cross-entropy
    total, start = 0.0, 0
    with torch.no_grad():
        for n in lengths:
            logits = m(x[:, start:start + n][:1])
            total += F.cross_entropy(logits[0].double(), labels[0, start:start + n], reduction="sum").item()
            start += n
        row1 = F.cross_entropy(m(x[1:])[0].double(), labels[1], ignore_index=IGNORE_INDEX).item()
    assert n_valid.tolist() == [L, L - 5]
    assert losses[0].item() == pytest.approx(total / L, rel=1e-5)
    assert losses[1].item() == pytest.approx(row1, rel=1e-5)


def test_a_single_document_row_is_unchanged_from_plain_causal_sdpa():
    """A row with one document (positions 0..L-1, the synthetic loader's rows) computes exactly what
    the earlier attention (TorchTitan's causal ScaledDotProductAttention) computed."""
    m = _tiny(seed=5)
    cfg = models.model_config("tiny", attn_backend="sdpa")
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    before = cfg.build()
    before.load_state_dict(m.state_dict())
    before.eval()
    x = torch.randint(0, V, (3, 64))
    pos = torch.arange(64).expand(3, 64)
    with torch.no_grad():
        old = before(x, positions=pos)
        assert torch.allclose(m(x, positions=pos), old, atol=1e-6, rtol=0)
        assert torch.equal(m(x), old)  # no positions: the causal kernel itself
