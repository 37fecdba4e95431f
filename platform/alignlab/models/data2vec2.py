"""The Data2Vec 2.0 image encoder, as the thesis' student starts from it (THESIS.md section 1, row 1), registered
as a timm model so `model.image.name: data2vec2_vit_base_patch16` builds it and `model.image.pretrained` loads
a fairseq checkpoint (`base_imagenet.pt`: `{"model": state_dict}` under fairseq's keys) through the same path
as any timm checkpoint, with `model.image.blocks` keeping its first k (or every other) blocks.

Architecture (fairseq `data2vec2`, `layer_norm_first=False`):
    patches = Conv(16x16, bias)(image) + fixed positions          (no position for the CLS token)
    x = LN([CLS; patches])                                         (the context encoder's norm, before the blocks)
    each block (post-LN):  x = LN1(x + Attn(x));  x = LN2(x + MLP(x))
    no final norm; pooled output = x[:, 0] (CLS)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

PREFIX = "modality_encoders.IMAGE."
KEY_MAP = {  # fairseq key (after PREFIX) -> this module's key
    "local_encoder.proj.weight": "patch_embed.weight",
    "local_encoder.proj.bias": "patch_embed.bias",
    "extra_tokens": "cls_token",
    "fixed_positional_encoder.positions": "pos_embed",
    "context_encoder.norm.weight": "norm_pre.weight",
    "context_encoder.norm.bias": "norm_pre.bias",
}


class PostLNBlock(nn.Module):
    """fairseq's AltBlock with layer_norm_first=False: the norms come after each residual sum."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.attn.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim))
        x = self.norm1(x + attended)
        return self.norm2(x + self.mlp.fc2(F.gelu(self.mlp.fc1(x))))


class Data2Vec2ImageEncoder(nn.Module):
    """images [B, 3, H, W] -> CLS features [B, embed_dim] (`forward_features`: all tokens [B, 1 + N, D])."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int = 0, **_ignored):
        super().__init__()
        if num_classes:
            raise ValueError("data2vec2 image encoder: a classifier head is not supported (num_classes must be 0)")
        self.patch_size, self.num_features, self.embed_dim = patch_size, embed_dim, embed_dim
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim, eps=1e-6)
        self.blocks = nn.Sequential(*[PostLNBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pretrained_cfg = {"classifier": None}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.norm_pre(torch.cat([self.cls_token.expand(images.shape[0], -1, -1), patches], dim=1))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[:, 0]


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """A fairseq Data2Vec 2.0 checkpoint (or its `model` entry) under this module's keys: the image
    modality's encoder and the shared blocks; the decoders, the EMA teacher and the other modalities are
    dropped. A state dict already in this module's keys passes through."""
    state_dict = state_dict.get("model", state_dict)
    if not any(key.startswith(PREFIX) for key in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key.startswith(PREFIX) and key[len(PREFIX):] in KEY_MAP:
            out[KEY_MAP[key[len(PREFIX):]]] = value
        elif key.startswith("blocks."):
            out[key] = value
    if "cls_token" in out and out["cls_token"].ndim == 2:
        out["cls_token"] = out["cls_token"][None]
    return out


@register_model
def data2vec2_vit_base_patch16(pretrained: bool = False, **kwargs) -> Data2Vec2ImageEncoder:
    """Data2Vec 2.0 ViT-B/16 image encoder (weights: a local fairseq checkpoint, `model.image.pretrained`)."""
    if pretrained:
        raise ValueError("data2vec2 weights are not on the timm hub: give a local fairseq checkpoint as "
                         "model.image.pretrained")
    return Data2Vec2ImageEncoder(**kwargs)
