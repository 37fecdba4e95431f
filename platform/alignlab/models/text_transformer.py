"""CLIP-style text transformer (docs/methods.md "CLIP": the text tower of the dual encoder).

Token embedding + learned positional embedding, pre-LN residual attention blocks, a final LayerNorm and
one pooled vector per caption. Follows open_clip's `TextTransformer` (init included) so that a ViT-B/32
preset counts the same parameters as CLIP; the projection to the shared space lives in `DualEncoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

POOLS = ("eot", "first", "mean")
CLIP_VOCAB_SIZE = 49408  # the CLIP BPE: 256 bytes x 2 (word-final or not) + 48,894 merges + SOT, EOT


class ResidualAttentionBlock(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)) (pre-LN, as in CLIP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def attention(self, x: torch.Tensor, key_keep: torch.Tensor | None) -> torch.Tensor:
        """Multi-head attention; causal when `key_keep` is None, otherwise over the kept keys only."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if key_keep is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_keep[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))

    def forward(self, x: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), key_keep)
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class TextTransformer(nn.Module):
    """Tokens [B, L] -> pooled features [B, width].

    pool:
      - "eot": features at the end-of-text token, found as the argmax token id (open_clip; valid for the
        CLIP BPE tokenizer, whose EOT id 49407 is the largest id in every sequence).
      - "first": features of the first (CLS / start) token; needs `causal=False`, since under a causal mask
        the first token sees only itself.
      - "mean": mean over the non-pad tokens (`tokens != pad_id`).
    causal: CLIP's causal mask. With `causal=False` attention is bidirectional and pad keys are masked out.
    """

    def __init__(
        self,
        vocab_size: int = CLIP_VOCAB_SIZE,
        context_length: int = 77,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        pool: str = "eot",
        causal: bool = True,
        pad_id: int = 0,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"text pool={pool!r} is not one of {POOLS}")
        if pool == "first" and causal:
            raise ValueError("text pool='first' needs causal=False: under a causal mask token 0 sees only itself")
        if width % heads != 0:
            raise ValueError(f"text width={width} must be divisible by heads={heads}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.pool = pool
        self.causal = causal
        self.pad_id = pad_id
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.init_parameters()

    @property
    def num_features(self) -> int:
        return self.width

    def init_parameters(self) -> None:
        """open_clip's init: small normal embeddings; residual-branch outputs scaled by (2 * layers)^-0.5."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * len(self.blocks)) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.qkv.weight, std=attn_std)
            nn.init.normal_(block.out_proj.weight, std=proj_std)
            nn.init.normal_(block.c_fc.weight, std=fc_std)
            nn.init.normal_(block.c_proj.weight, std=proj_std)
            for linear in (block.qkv, block.out_proj, block.c_fc, block.c_proj):
                nn.init.zeros_(linear.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (saves memory; DiHT L/14 uses it)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """timm convention: parameter names (relative to this module) that take no weight decay."""
        return {"positional_embedding"}

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token features after the final LayerNorm: tokens [B, L] -> [B, L, width]."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"text tokens must be [batch, <= {self.context_length}], got shape {tuple(tokens.shape)}"
            )
        key_keep = None if self.causal else tokens != self.pad_id
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, key_keep, use_reentrant=False)
            else:
                x = block(x, key_keep)
        return self.ln_final(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, width] (see the class docstring for `pool`)."""
        tokens = trim_padding(tokens, self.pad_id)
        x = self.forward_tokens(tokens)
        if self.pool == "eot":
            return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        if self.pool == "first":
            return x[:, 0]
        weights = (tokens != self.pad_id).unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def trim_padding(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """`tokens` without its trailing columns that are padding in every row; the pooled features do not change.

    No pool reads a pad position, a causal position sees only earlier ones and bidirectional attention masks
    pad keys, so those columns only cost compute: CLIP captions fill about 15 of 77 positions, and the
    text tower's cost is linear in the length (more with attention). One host sync (the new length). Under
    torch.compile the columns are kept: a fixed shape compiles once, a data-dependent one breaks the graph.
    """
    if torch.compiler.is_compiling():
        return tokens
    used = (tokens != pad_id).any(dim=0)
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    length = max(1, int((used * positions).max()))
    return tokens if length == tokens.shape[1] else tokens[:, :length]
