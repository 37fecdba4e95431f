"""The thesis' shared encoders and token-type embeddings (docs/methods.md, "Thesis methods"; thesis sections
3.2.1-3.2.3): modules that sit on top of the image and text towers and are applied to each modality
separately, with the same weights.

- `SharedMLP` (SHRe_T, Eq 43-44) on a pooled vector:
      h'   = h W1 + b1                 (D -> 4D)
      h''  = LN(GELU(h')) W2 + b2      (4D -> D)
      h''' = LN(h'') W3 + b3           (D -> C: the teacher's classes, or D for regression)
- `SharedBlock` (Eq 49-52) on a token sequence with its padding mask, one pre-LN Transformer block:
      H_mha = H + ls1 * MHA(LN(H))                    (pad keys masked)
      H'    = LN(H_mha) W1 + b1
      H''   = [LN](GELU(H')) W2 + b2                  (inner LN: thesis text; off by default, as the code)
      out   = H_mha + ls2 * H''
      h'''  = LN(out)[CLS] W3 + b3
  The contrastive losses use the CLS rows of H' and of h'' where h'' is `out` (the released code, default
  `h2_source="residual"`) or the raw H'' (the thesis' equations, `h2_source="fc2"`). LayerScale 0.2 on both
  branches is the code's (`layerscale_init=None` removes it).
- `TokenTypeEmbedding` (Eq 58-62): one learnable vector per modality (text 0, image 1) added to the encoders'
  outputs ("after"), or scaled by a LayerScale vector initialised to 1e-5 ("after_ls"). "before" (VLMo style,
  added at the encoders' inputs) is applied by the caller to the input embeddings through `vector()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

H2_SOURCES = ("residual", "fc2")
TTE_MODES = ("none", "before", "after", "after_ls")
MODALITIES = {"text": 0, "image": 1}


def _init_linear(linear: nn.Linear) -> None:
    nn.init.trunc_normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)


class SharedMLP(nn.Module):
    """SHRe_T's shared 3-layer MLP on a pooled vector [B, D] -> {"h1": [B, 4D], "h2": [B, D], "h3": [B, C]}."""

    def __init__(self, dim: int, out_dim: int, hidden: int | None = None, eps: float = 1e-6):
        super().__init__()
        hidden = hidden or 4 * dim
        self.fc1, self.fc2, self.head = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Linear(dim, out_dim)
        self.ln1, self.ln2 = nn.LayerNorm(hidden, eps=eps), nn.LayerNorm(dim, eps=eps)
        for linear in (self.fc1, self.fc2, self.head):
            _init_linear(linear)

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        h1 = self.fc1(pooled)
        h2 = self.fc2(self.ln1(F.gelu(h1)))
        return {"h1": h1, "h2": h2, "h3": self.head(self.ln2(h2))}


class SharedBlock(nn.Module):
    """One Transformer block shared by both modalities, each sequence on its own:
    (tokens [B, L, D], keep [B, L] bool) -> {"h1": [B, 4D], "h2": [B, D], "h3": [B, C]} on the CLS (row 0)."""

    def __init__(self, dim: int, heads: int, out_dim: int, mlp_ratio: float = 4.0, *, ffn_inner_ln: bool = False,
                 layerscale_init: float | None = 0.2, h2_source: str = "residual", eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"shared block width {dim} must be divisible by heads={heads}")
        if h2_source not in H2_SOURCES:
            raise ValueError(f"shared block h2_source={h2_source!r} is not one of {H2_SOURCES}")
        hidden = int(dim * mlp_ratio)
        self.heads, self.h2_source = heads, h2_source
        self.norm1, self.norm2, self.norm_out = (nn.LayerNorm(dim, eps=eps) for _ in range(3))
        # The released code biases q and v only. A k bias changes nothing: it adds q . b_k to every key's logit
        # of a query, which the softmax cancels (and its gradient is zero), so one biased qkv is equivalent.
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2, self.head = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Linear(dim, out_dim)
        self.inner_norm = nn.LayerNorm(hidden, eps=eps) if ffn_inner_ln else nn.Identity()
        for linear in (self.qkv, self.proj, self.fc1, self.fc2, self.head):
            _init_linear(linear)
        if layerscale_init is None:
            self.register_parameter("ls1", None)
            self.register_parameter("ls2", None)
        else:
            self.ls1 = nn.Parameter(torch.full((dim,), float(layerscale_init)))
            self.ls2 = nn.Parameter(torch.full((dim,), float(layerscale_init)))

    def _attention(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None,
                return_tokens: bool = False) -> dict[str, torch.Tensor]:
        """return_tokens adds "h3_tokens": the head on every token [B, L, C] (T-CMLI's token targets)."""
        if tokens.ndim != 3:
            raise ValueError(f"shared block needs a token sequence [B, L, D], got shape {tuple(tokens.shape)}")
        keep = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if keep is None else keep
        attended = self._attention(self.norm1(tokens), keep)
        h_mha = tokens + (attended * self.ls1 if self.ls1 is not None else attended)
        h1 = self.fc1(self.norm2(h_mha))
        h2_raw = self.fc2(self.inner_norm(F.gelu(h1)))
        out = h_mha + (h2_raw * self.ls2 if self.ls2 is not None else h2_raw)
        h2 = out if self.h2_source == "residual" else h2_raw
        result = {"h1": h1[:, 0], "h2": h2[:, 0], "h3": self.head(self.norm_out(out)[:, 0])}
        if return_tokens:
            result["h3_tokens"] = self.head(self.norm_out(out))
        return result


class TokenTypeEmbedding(nn.Module):
    """One learnable vector per modality (nn.Embedding(2, D), N(0, 1) init, as `nn.Embedding`'s default).

    mode "after": x + t_m; "after_ls": x + gamma * t_m with one gamma in R^D shared by both modalities,
    initialised to `layerscale_init` (1e-5); "before": the caller adds `vector(modality)` to the encoder's
    input embeddings; "none": identity. Works on pooled [B, D] and sequence [B, L, D] inputs alike.
    """

    def __init__(self, dim: int, mode: str = "after_ls", layerscale_init: float = 1e-5):
        super().__init__()
        if mode not in TTE_MODES:
            raise ValueError(f"token-type embedding mode={mode!r} is not one of {TTE_MODES}")
        self.mode = mode
        self.embedding = nn.Embedding(len(MODALITIES), dim)
        # "none" never reads it: frozen, so that DDP (which fails on a trainable parameter without a gradient)
        # and the optimiser leave it alone. Kept, not dropped: the same random draws initialise the rest of the
        # model, and checkpoints keep their keys.
        self.embedding.weight.requires_grad_(mode != "none")
        self.gamma = nn.Parameter(torch.full((dim,), layerscale_init)) if mode == "after_ls" else None

    def vector(self, modality: str) -> torch.Tensor:
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r} is not one of {sorted(MODALITIES)}")
        return self.embedding.weight[MODALITIES[modality]]

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Apply the "after" modes to an encoder output; identity for "none" and "before"."""
        if self.mode in ("none", "before"):
            return x
        vector = self.vector(modality)
        return x + (self.gamma * vector if self.gamma is not None else vector)
