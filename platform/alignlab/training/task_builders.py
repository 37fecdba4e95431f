"""Builders of the thesis' single-modality tasks (config sections `unimodal` and `vq`): the task model with its
frozen teacher, and its loss `(outputs, context) -> (terms, logs)` in the form the trainer sums. Both return
None when the config trains the image-text objective, so the trainer asks here first."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from alignlab.config import ConfigError, ExperimentConfig
from alignlab.data.transforms import CLIP_MEAN, CLIP_STD
from alignlab.losses.layer_average import layer_averaged_kd_loss
from alignlab.losses.vq import image_vq_loss


def task_model_from_config(cfg: ExperimentConfig) -> nn.Module | None:
    """The `LayerAveragedKD` or `ImageVQ` model of `cfg` (teacher loaded, frozen), or None."""
    if cfg.unimodal is not None:
        return _unimodal_model(cfg)
    if cfg.vq is not None:
        from alignlab.models.image_vq import ImageVQ
        from alignlab.teachers import load_teacher

        v = cfg.vq
        teacher = load_teacher(v.teacher, arch=v.teacher_arch, kwargs=v.teacher_kwargs)
        return ImageVQ(teacher, teacher.backbone.num_features, codebook_size=v.codebook_size, code_dim=v.code_dim,
                       decay=v.decay, mask_ratio=v.mask_ratio, image_size=cfg.data.image_size,
                       patch_size=v.patch_size, heads=v.decoder_heads, input_mean=CLIP_MEAN, input_std=CLIP_STD,
                       mask_seed=cfg.seed)
    return None


def _unimodal_model(cfg: ExperimentConfig) -> nn.Module:
    from alignlab.models.towers import HFTextTower, ImageTower
    from alignlab.models.unimodal_kd import LayerAveragedKD

    u = cfg.unimodal
    image = u.modality == "image"
    final_ln = image if u.final_ln is None else u.final_ln
    include_embeddings = (not image) if u.include_embeddings is None else u.include_embeddings
    if image:
        from alignlab.teachers import load_teacher

        i = cfg.model.image
        student = ImageTower(i.name, pretrained=i.pretrained, blocks=i.blocks, block_selection=i.block_selection,
                             **i.kwargs)
        teacher = load_teacher(u.teacher, arch=u.teacher_arch, kwargs=u.teacher_kwargs)
        if not hasattr(teacher.backbone, "model"):
            raise ConfigError(f"unimodal.teacher={u.teacher!r} is not a timm model: image distillation reads the "
                              "outputs of its blocks")
    else:
        from transformers import AutoModel

        t = cfg.model.text
        student = HFTextTower(t.hf_name_or_path or t.hf_config, pool=t.pool, layers=t.hf_layers,
                              layer_selection=t.hf_layer_selection)
        if not Path(u.teacher).is_dir():
            raise ConfigError(f"unimodal.teacher={u.teacher} is not a directory: text distillation reads a "
                              "transformers encoder written by save_pretrained")
        teacher = AutoModel.from_pretrained(u.teacher)
    return LayerAveragedKD(student, teacher, u.modality, final_ln=final_ln, include_embeddings=include_embeddings,
                           input_mean=CLIP_MEAN, input_std=CLIP_STD)


def task_loss_from_config(cfg: ExperimentConfig):
    """The task's loss: `kd_<modality>` (layer-averaged MSE), or the VQ terms with the batch's codebook usage."""
    if cfg.unimodal is not None:
        name = f"kd_{cfg.unimodal.modality}"

        def layer_averaged_distillation(outputs: dict, context: dict):
            return {name: layer_averaged_kd_loss(outputs["prediction"], outputs["target"], outputs["keep"])}, {}
        return layer_averaged_distillation
    if cfg.vq is not None:
        from alignlab.models.image_vq import codebook_usage

        size = cfg.vq.codebook_size

        def image_vq(outputs: dict, context: dict):
            reconstruction, commitment = image_vq_loss(outputs["prediction"], outputs["teacher_cls"], outputs["z"],
                                                       outputs["code"])
            usage = codebook_usage(outputs["indices"], size)
            return ({"vq_reconstruction": reconstruction, "vq_commitment": commitment},
                    {"vq/perplexity": usage["perplexity"], "vq/usage": usage["usage"]})
        return image_vq
    return None
