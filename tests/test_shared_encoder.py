"""The thesis' shared encoders and token-type embeddings against the equations (float64, written by hand)."""

import math

import pytest
import torch

from alignlab.models.shared_encoder import SharedBlock, SharedMLP, TokenTypeEmbedding


def _ln(x, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)  # the LayerNorms start at weight 1, bias 0


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _lin(linear, x):
    return x @ linear.weight.T + linear.bias


def test_shared_mlp_is_eq_43_44():
    torch.manual_seed(0)
    mlp = SharedMLP(dim=8, out_dim=5).double()
    h = torch.randn(3, 8, dtype=torch.float64)
    out = mlp(h)
    h1 = _lin(mlp.fc1, h)
    h2 = _lin(mlp.fc2, _ln(_gelu(h1)))
    h3 = _lin(mlp.head, _ln(h2))
    for key, want in (("h1", h1), ("h2", h2), ("h3", h3)):
        torch.testing.assert_close(out[key], want)
    assert out["h1"].shape == (3, 32) and out["h3"].shape == (3, 5)


def _block_reference(block, tokens, keep):
    """Eq 49-52 with the block's options, attention written out with an explicit masked softmax."""
    batch, length, dim = tokens.shape
    heads, head_dim = block.heads, dim // block.heads
    x = _ln(tokens)
    q, k, v = _lin(block.qkv, x).split(dim, dim=-1)
    outs = []
    for b in range(batch):
        per_head = []
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            logits = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(head_dim)
            logits = logits.masked_fill(~keep[b][None, :], -math.inf)
            per_head.append(torch.softmax(logits, -1) @ v[b, :, cols])
        outs.append(torch.cat(per_head, -1))
    attended = _lin(block.proj, torch.stack(outs))
    ls1 = block.ls1 if block.ls1 is not None else 1.0
    ls2 = block.ls2 if block.ls2 is not None else 1.0
    h_mha = tokens + ls1 * attended
    h1 = _lin(block.fc1, _ln(h_mha))
    inner = _gelu(h1)
    if not isinstance(block.inner_norm, torch.nn.Identity):
        inner = _ln(inner)
    h2_raw = _lin(block.fc2, inner)
    out = h_mha + ls2 * h2_raw
    h2 = out if block.h2_source == "residual" else h2_raw
    return {"h1": h1[:, 0], "h2": h2[:, 0], "h3": _lin(block.head, _ln(out)[:, 0])}


@pytest.mark.parametrize("options", [
    {},  # the released code: no inner LN, LayerScale 0.2, h'' after the residual
    {"ffn_inner_ln": True, "layerscale_init": None, "h2_source": "fc2"},  # the thesis' equations
])
def test_shared_block_is_eq_49_52(options):
    torch.manual_seed(1)
    block = SharedBlock(dim=8, heads=2, out_dim=6, **options).double()
    with torch.no_grad():  # move the norms and LayerScales off their init so a wrong one shows
        if block.ls1 is not None:
            block.ls1.uniform_(0.1, 0.9)
            block.ls2.uniform_(0.1, 0.9)
    tokens = torch.randn(2, 5, 8, dtype=torch.float64)
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    got = block(tokens, keep)
    want = _block_reference(block, tokens, keep)
    for key in ("h1", "h2", "h3"):
        torch.testing.assert_close(got[key], want[key])


def test_shared_block_ignores_what_padding_holds():
    torch.manual_seed(2)
    block = SharedBlock(dim=8, heads=2, out_dim=4).double()
    tokens = torch.randn(1, 6, 8, dtype=torch.float64)
    keep = torch.tensor([[True, True, True, True, False, False]])
    other = tokens.clone()
    other[0, 4:] = 100.0
    for key, value in block(tokens, keep).items():
        torch.testing.assert_close(block(other, keep)[key], value)
    assert not torch.allclose(block(other)["h3"], block(tokens)["h3"])  # without the mask it would matter
    with pytest.raises(ValueError, match="h2_source"):
        SharedBlock(8, 2, 4, h2_source="fc1")


def test_token_type_embedding_modes():
    torch.manual_seed(3)
    x = torch.randn(2, 4)
    after = TokenTypeEmbedding(4, mode="after")
    torch.testing.assert_close(after(x, "image"), x + after.embedding.weight[1])
    torch.testing.assert_close(after(x, "text"), x + after.embedding.weight[0])
    scaled = TokenTypeEmbedding(4, mode="after_ls")
    assert torch.equal(scaled.gamma, torch.full((4,), 1e-5))
    torch.testing.assert_close(scaled(x, "image"), x + 1e-5 * scaled.embedding.weight[1])
    sequence = torch.randn(2, 3, 4)
    torch.testing.assert_close(scaled(sequence, "text"), sequence + 1e-5 * scaled.embedding.weight[0])
    for mode in ("none", "before"):
        assert torch.equal(TokenTypeEmbedding(4, mode=mode)(x, "image"), x)
    before = TokenTypeEmbedding(4, mode="before")
    assert torch.equal(before.vector("image"), before.embedding.weight[1])  # the caller adds it at the inputs
    with pytest.raises(ValueError, match="modality 'audio'"):
        after(x, "audio")
    with pytest.raises(ValueError, match="mode='middle'"):
        TokenTypeEmbedding(4, mode="middle")
