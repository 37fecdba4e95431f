"""Losses: each a function `(image_features, text_features, logit_scale, ...)` whose docstring names its
equation; cross-rank gathering is shared in `alignlab.losses.distributed`."""

from alignlab.losses.clip import clip_loss
from alignlab.losses.distill import (
    distribution_distill_loss,
    embedding_distill_loss,
    keep_top_k,
    soft_target_cross_entropy,
    topk_distribution,
)
from alignlab.losses.distributed import (
    LossBatch,
    gather_column_values,
    gather_features,
    gather_row_values,
)
from alignlab.losses.hn_nce import hn_nce_loss
from alignlab.losses.knowledge import (
    contrastive_target_loss,
    ctl_kd_loss,
    multi_layer_clip_loss,
    shre_kd_loss,
    ssmke_mse_loss,
)
from alignlab.losses.itm import itm_loss, sample_itm_negatives
from alignlab.losses.late_interaction import tcmli_loss
from alignlab.losses.layer_average import layer_averaged_kd_loss, layer_averaged_target
from alignlab.losses.memory_bank import FeatureQueue, TeacherMemoryBank
from alignlab.losses.vq import image_vq_loss
from alignlab.losses.psd import psd_loss, psd_loss_terms, psd_target_diagnostics
from alignlab.losses.queued import momentum_clip_loss, queued_infonce, student_bank_clip_loss

__all__ = [
    "FeatureQueue",
    "LossBatch",
    "TeacherMemoryBank",
    "clip_loss",
    "contrastive_target_loss",
    "ctl_kd_loss",
    "distribution_distill_loss",
    "embedding_distill_loss",
    "gather_column_values",
    "gather_features",
    "gather_row_values",
    "hn_nce_loss",
    "image_vq_loss",
    "itm_loss",
    "keep_top_k",
    "layer_averaged_kd_loss",
    "layer_averaged_target",
    "momentum_clip_loss",
    "multi_layer_clip_loss",
    "psd_loss",
    "psd_loss_terms",
    "psd_target_diagnostics",
    "queued_infonce",
    "sample_itm_negatives",
    "shre_kd_loss",
    "soft_target_cross_entropy",
    "ssmke_mse_loss",
    "student_bank_clip_loss",
    "tcmli_loss",
    "topk_distribution",
]
