"""The thesis' student (docs/methods.md, "Thesis methods"; thesis sections 3.2.1-3.2.3): an image tower and a
text tower of the same width, optional token-type embeddings, and one shared module applied to each
modality separately: the SHRe MLP on the pooled vectors, or a shared Transformer block on the token
sequences.

`forward(images, tokens)` returns what the thesis' losses need:
- `layers`: the L2-normalised (image, text) vectors of every layer a contrastive loss uses (h', h'', h''' for
  the MLP; h', h'' for the block), with `logit_scales` [L], one learnable, clamped scale per layer;
- `image_head`, `text_head`: the raw h''' outputs, for the KD losses (teacher logits or CLS);
- `image_features`, `text_features`, `logit_scale`: the retrieval / zero-shot vector (h''' for the MLP, h''
  for the block by default: `retrieval_layer`) in the names the rest of the platform reads;
- `bank`: the teacher memory bank (`attach_bank`) for the contrastive target loss, or None;
- with T-CMLI's projection g attached (`attach_tcmli`, shared block only): `image_tokens`, `text_tokens` (h'''
  on every token), `text_keep` (the caption's word tokens: no CLS, end or pad) and `tcmli_projection`.
- `raw_layers`: the (image, text) vectors of the same layers before normalisation (ITM reads them);
- `momentum`: the momentum encoder's normalised (image, text) h'' of the batch, computed before the student's
  forward pass while training, or None; `momentum_encoder`, `student_bank`, `itm`: the attached modules
  (`attach`), or None.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.dual_encoder import TowerPair
from alignlab.models.shared_encoder import TTE_MODES, SharedBlock, SharedMLP, TokenTypeEmbedding
from alignlab.models.text_transformer import TextTransformer
from alignlab.models.towers import HFTextTower

SHARED_KINDS = ("mlp", "block")
# Modules only training uses; a model rebuilt for evaluation has none and drops their saved state.
TRAINING_MODULES = ("bank", "momentum_encoder", "student_bank", "itm", "tcmli")
LAYERS = {"mlp": ("h1", "h2", "h3"), "block": ("h1", "h2")}


def token_sequence(tower: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [B, L, D], keep [B, L] bool) of a tower, the CLS / start token at position 0.

    Image towers: timm's `forward_features` (ViT-like models return [B, tokens, D]; a CNN's feature map has
    no CLS token and is refused). Text towers: `forward_tokens` of the in-house transformer, or the
    transformers encoder's last hidden state; pad positions are not kept.
    """
    if isinstance(tower, HFTextTower):
        keep = inputs != tower.pad_id
        return tower.model(input_ids=inputs, attention_mask=keep.long()).last_hidden_state, keep
    if isinstance(tower, TextTransformer):
        return tower.forward_tokens(inputs), inputs != tower.pad_id
    hidden = tower.model.forward_features(inputs)
    if hidden.ndim != 3:
        raise ValueError(f"a shared Transformer block needs a token sequence from the image tower; "
                         f"{type(tower.model).__name__} gives shape {tuple(hidden.shape)}: use a ViT-like tower")
    return hidden, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)


class ThesisStudent(TowerPair):
    """Image tower + text tower + token-type embeddings + one shared module (see the module docstring)."""

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, *, shared: str = "mlp", out_dim: int,
                 heads: int = 12, tte: str = "none", retrieval_layer: str | None = None,
                 block_options: dict | None = None, init_logit_scale: float = 1 / 0.07,
                 max_logit_scale: float = 100.0):
        super().__init__()
        if shared not in SHARED_KINDS:
            raise ValueError(f"shared encoder {shared!r} is not one of {SHARED_KINDS}")
        if tte not in TTE_MODES:
            raise ValueError(f"token-type embedding mode={tte!r} is not one of {TTE_MODES}")
        width = image_tower.num_features
        if text_tower.num_features != width:
            raise ValueError(f"the shared encoder needs towers of one width: image {width}, text "
                             f"{text_tower.num_features}")
        self.layer_names = LAYERS[shared]
        retrieval_layer = retrieval_layer or ("h3" if shared == "mlp" else "h2")
        if retrieval_layer not in self.layer_names + ("h3",):
            raise ValueError(f"retrieval_layer={retrieval_layer!r} is not one of {self.layer_names + ('h3',)}")
        self.image_tower, self.text_tower = image_tower, text_tower
        self.shared_kind, self.retrieval_layer, self.max_logit_scale = shared, retrieval_layer, max_logit_scale
        self.shared = (SharedMLP(width, out_dim) if shared == "mlp"
                       else SharedBlock(width, heads, out_dim, **(block_options or {})))
        self.tte = TokenTypeEmbedding(width, mode=tte)
        if tte == "before":
            self._register_input_hooks()
        self.logit_scales = nn.Parameter(torch.full((len(self.layer_names),), math.log(init_logit_scale)))
        self.bank: nn.Module | None = None
        self.tcmli: nn.Module | None = None
        self.momentum_encoder: nn.Module | None = None
        self.student_bank: nn.Module | None = None
        self.itm: nn.Module | None = None

    def attach_bank(self, bank: nn.Module) -> None:
        """Hold the contrastive target loss' teacher memory bank (`alignlab.losses.TeacherMemoryBank`) as a
        submodule, so checkpoints carry its state and a resumed run continues with the same negatives."""
        self.bank = bank

    def attach_tcmli(self, projection: nn.Module) -> None:
        """Hold T-CMLI's learned projection g (trained and checkpointed with the student); forward then returns
        the token sequences its loss reads. The shared block only: the MLP sees no tokens."""
        if self.shared_kind != "block":
            raise ValueError("T-CMLI regresses token sequences: it needs the shared block (model.student.shared=block)")
        self.attach("tcmli", projection)

    def attach(self, name: str, module: nn.Module) -> None:
        """Hold a training-only module (`TRAINING_MODULES`: the momentum encoder, the student memory bank, the
        ITM heads, T-CMLI's g) as a submodule, so checkpoints and the optimizer see it."""
        if name not in TRAINING_MODULES:
            raise ValueError(f"cannot attach {name!r}: the student holds only {TRAINING_MODULES}")
        setattr(self, name, module)

    def layer_widths(self) -> dict[str, int]:
        """Width of each layer's vector: h1 (the FFN's hidden width), h2 (the towers'), h3 (out_dim)."""
        return {"h1": self.shared.fc1.out_features, "h2": self.shared.fc2.out_features,
                "h3": self.shared.head.out_features}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As `nn.Module.load_state_dict`; the saved state of a training-only module (the bank, the momentum
        encoder, ...) is dropped when this model has none (a model rebuilt for evaluation from the config
        alone). Training attaches its modules before it resumes."""
        absent = tuple(f"{name}." for name in TRAINING_MODULES if getattr(self, name) is None)
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(absent)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _register_input_hooks(self) -> None:
        """"before": add the modality vector to the encoders' input embeddings (VLMo style)."""
        text_embedding = getattr(self.text_tower, "token_embedding", None)
        image_entry = getattr(self.image_tower.model, "patch_embed", None)
        if text_embedding is None or image_entry is None:
            raise ValueError("tte='before' needs a ViT-like image tower and the in-house text transformer")
        # Bound methods, not closures: a deep copy (the momentum encoder) then adds its own vectors.
        text_embedding.register_forward_hook(self._add_text_type)
        image_entry.register_forward_hook(self._add_image_type)

    def _add_text_type(self, _module: nn.Module, _inputs, out: torch.Tensor) -> torch.Tensor:
        return out + self.tte.vector("text")

    def _add_image_type(self, _module: nn.Module, _inputs, out: torch.Tensor) -> torch.Tensor:
        return out + self.tte.vector("image")

    def _encode(self, tower: nn.Module, inputs: torch.Tensor, modality: str,
                tokens: bool = False) -> dict[str, torch.Tensor]:
        if self.shared_kind == "mlp":
            return self.shared(self.tte(tower(inputs), modality))
        hidden, keep = token_sequence(tower, inputs)
        if not tokens:
            return self.shared(self.tte(hidden, modality), keep)
        return self.shared(self.tte(hidden, modality), keep, return_tokens=True) | {"keep": keep}

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self._encode(self.image_tower, images, "image")[self.retrieval_layer]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self._encode(self.text_tower, tokens, "text")[self.retrieval_layer]
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        momentum = (self.momentum_encoder.step(self, images, tokens)  # first: the thesis' order (Fig. 26)
                    if self.momentum_encoder is not None and self.training else None)
        late = self.tcmli is not None
        image = self._encode(self.image_tower, images, "image", tokens=late)
        text = self._encode(self.text_tower, tokens, "text", tokens=late)
        scales = self.logit_scales.exp().clamp(max=self.max_logit_scale)
        layers = [(F.normalize(image[name], dim=-1), F.normalize(text[name], dim=-1)) for name in self.layer_names]
        retrieval_scale = (scales[self.layer_names.index(self.retrieval_layer)]
                           if self.retrieval_layer in self.layer_names else scales[-1])
        return {"layers": layers, "logit_scales": scales, "image_head": image["h3"], "text_head": text["h3"],
                "image_features": F.normalize(image[self.retrieval_layer], dim=-1),
                "text_features": F.normalize(text[self.retrieval_layer], dim=-1), "logit_scale": retrieval_scale,
                "bank": self.bank, "raw_layers": [(image[name], text[name]) for name in self.layer_names],
                "momentum": momentum, "momentum_encoder": self.momentum_encoder, "student_bank": self.student_bank,
                "itm": self.itm} | (self._late_interaction_outputs(image, text) if late else {})

    def _late_interaction_outputs(self, image: dict, text: dict) -> dict:
        """T-CMLI's inputs: every token's h''', and the caption's word tokens (CLS, the end token and pads out)."""
        keep = text["keep"].clone()
        keep[:, 0] = False
        last = keep.shape[1] - 1 - text["keep"].flip(1).int().argmax(dim=1)  # the end token: the last kept one
        keep[torch.arange(keep.shape[0], device=keep.device), last] = False
        return {"image_tokens": image["h3_tokens"], "text_tokens": text["h3_tokens"], "text_keep": keep,
                "tcmli_projection": self.tcmli}

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Each layer's log-scale clamped to [0, log(max_logit_scale)] after every step (thesis, open_clip)."""
        self.logit_scales.clamp_(0, math.log(self.max_logit_scale))
