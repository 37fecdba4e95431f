"""Builder functions: config sections in, plain objects out (configs never reach inside classes)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alignlab.config import (ConfigError, DataConfig, DistillConfig, ExperimentConfig, ImageTowerConfig,
                             KnowledgeConfig, LossConfig, ModelConfig)
from alignlab.data.dataset import PairDataset, open_train_source
from alignlab.data.shards import WebDatasetIndex
from alignlab.data.skips import CorruptSampleError
from alignlab.data.tokenizers import build_tokenizer
from alignlab.data.transforms import build_image_transform
from alignlab import losses
from alignlab.models import build_dual_encoder
from alignlab.models.presets import build_image_tower, build_text_tower
from alignlab.models.thesis_student import ThesisStudent
from alignlab.training import thesis_objectives
from alignlab.training.optim import GroupRule
from alignlab.training.psd_partition import aligned_mask, alpha_at
from alignlab.training.teacher_targets import TeacherTargets, target_sizes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tokenizer_from_config(model: ModelConfig, data: DataConfig | None = None, data_root: Path | str | None = None):
    """CLIP BPE, or WordPiece from a vocab file; without one, WordPiece is trained on the training
    captions once and its vocabulary kept next to the data (`wordpiece-<size>.txt`) for later runs."""
    tok = model.tokenizer
    if tok.kind == "hf":
        return _hf_tower_tokenizer(model.text.hf_name_or_path, tok.context_length)
    vocab_file = tok.vocab_file
    needs_local_root = (vocab_file is not None and not Path(vocab_file).is_absolute()) or (
        tok.kind == "wordpiece" and vocab_file is None)
    if isinstance(data_root, str) and needs_local_root:
        raise ValueError(f"model.tokenizer.vocab_file must be an absolute local path when data.root is {data_root}: "
                         "vocabularies next to the data (and the WordPiece cache) live on local disk only")
    if vocab_file and data_root is not None and not Path(vocab_file).is_absolute():
        candidate = data_root / vocab_file
        vocab_file = str(candidate) if candidate.exists() else vocab_file
    if tok.kind == "wordpiece" and vocab_file is None:
        if data is None or data_root is None:
            raise ValueError("model.tokenizer.vocab_file is required for wordpiece outside a training run")
        cached = data_root / f"wordpiece-{tok.vocab_size}.txt"
        if not cached.exists():
            captions = _training_captions(open_train_source(data.format, _train_spec(data, data_root)))
            build_tokenizer("wordpiece", tok.context_length, train_texts=captions,
                            vocab_size=tok.vocab_size).save(cached)
        vocab_file = str(cached)
    return build_tokenizer(tok.kind, context_length=tok.context_length, vocab_file=vocab_file,
                           vocab_size=tok.vocab_size, random_subsequence=tok.random_subsequence)


def _hf_tower_tokenizer(source: str, context_length: int):
    """WordPiece from the vocab.txt saved beside a transformers text tower (`save_pretrained` of the model
    and its tokenizer); a hub name would need the network at run time, so it must be saved locally first."""
    folder = Path(source)
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise ConfigError(f"model.tokenizer.kind=hf needs {vocab}: save the tower's tokenizer next to it "
                          "(tokenizer.save_pretrained(folder)); hub names are not downloaded at run time")
    return build_tokenizer("wordpiece", context_length, vocab_file=vocab)


def _training_captions(source) -> list[str]:
    captions = []
    for i in range(len(source)):
        try:
            caption = source[i]["txt"] if isinstance(source, WebDatasetIndex) else source.get(i)[1]
        except CorruptSampleError:
            continue  # training skips it too (and records it there)
        captions.extend([caption] if isinstance(caption, str) else caption or [])
    return captions


def _train_spec(data: DataConfig, data_root: Path | str) -> str:
    if data.train.startswith("s3://"):
        return data.train
    if isinstance(data_root, str):  # s3:// root
        if Path(data.train).is_absolute():
            raise ValueError(f"data.train={data.train!r} is a local path but data.root is {data_root}; give it "
                             "relative to the root (e.g. 'train') or as an s3:// URI")
        return f"{data_root}/{data.train.strip('/')}"
    train = Path(data.train)
    return str(train if train.is_absolute() else data_root / train)


def _manifest_for(data_root: Path | str) -> str | None:
    """The manifest.json that s3:// shards are checked against (cheaply, see alignlab.data.shards);
    local datasets are read as before, unchecked."""
    return f"{data_root}/manifest.json" if isinstance(data_root, str) else None


def model_from_config(model: ModelConfig, tokenizer) -> torch.nn.Module:
    t = model.text
    if t.kind == "clip":
        text = {"kind": "clip", "vocab_size": tokenizer.vocab_size, "context_length": tokenizer.context_length,
                "width": t.width, "layers": t.layers, "heads": t.heads, "mlp_ratio": t.mlp_ratio, "pool": t.pool,
                "causal": t.causal, "pad_id": tokenizer.pad_id}
    else:
        if (t.hf_name_or_path is None) == (t.hf_config is None):
            raise ValueError("model.text.kind=hf needs exactly one of model.text.hf_name_or_path or model.text.hf_config")
        text = {"kind": "hf", "source": t.hf_name_or_path or t.hf_config, "pool": t.pool, "layers": t.hf_layers,
                "layer_selection": t.hf_layer_selection}
    image = model.image.model_dump(include={"name", "pretrained", "kwargs", "blocks", "block_selection"})
    if model.student is not None:
        s = model.student
        net = ThesisStudent(build_image_tower(image), build_text_tower(text), shared=s.shared, out_dim=s.out_dim,
                            heads=s.heads, tte=s.tte, retrieval_layer=s.retrieval_layer,
                            block_options={"ffn_inner_ln": s.ffn_inner_ln, "layerscale_init": s.layerscale_init,
                                           "h2_source": s.h2_source},
                            init_logit_scale=model.init_logit_scale, max_logit_scale=model.max_logit_scale)
    else:
        net = build_dual_encoder(embed_dim=model.embed_dim, image=image, text=text,
                                 init_logit_scale=model.init_logit_scale, max_logit_scale=model.max_logit_scale,
                                 projection=model.projection)
    if t.kind == "hf" and tokenizer.vocab_size > net.text_tower.model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the text tower's embedding has "
                          f"{net.text_tower.model.config.vocab_size} rows: use the tower's own vocabulary "
                          "(model.tokenizer.kind=hf)")
    if model.grad_checkpointing:
        net.set_grad_checkpointing(True)
    return net


def transforms_from_config(data: DataConfig):
    train = build_image_transform(data.image_size, train=True, crop_scale=tuple(data.crop_scale), hflip=data.hflip)
    evaluate = build_image_transform(data.image_size, train=False)
    return train, evaluate


def train_dataset_from_config(data: DataConfig, data_root: Path | str, tokenizer, transform) -> PairDataset:
    spec = _train_spec(data, data_root)
    source = open_train_source(data.format, spec, manifest=_manifest_for(data_root),
                               max_caption_bytes=data.max_caption_bytes)
    return PairDataset(source, tokenizer, transform, name=spec)


def loss_from_config(loss: LossConfig, world_size: int, seed: int, distill: DistillConfig | None = None):
    """A callable `(outputs, batch_context) -> (terms, logs)`: named loss terms the trainer sums, and
    scalars to log alongside them (e.g. PSD's alpha). With `distill`, the distillation terms (docs/methods.md "DiHT
    concept distillation")
    join the contrastive one; they read the teacher targets in `context["targets"]`."""
    mode = loss.distributed if world_size > 1 else "none"
    if distill is not None and distill.knowledge.kind != "off":
        return _knowledge_extraction(distill.knowledge, mode, seed)
    contrastive = _contrastive_loss(loss, mode, seed, distill or DistillConfig())
    if distill is None or not (distill.concepts.names or distill.embedding.enabled):
        return contrastive
    c, e = distill.concepts, distill.embedding
    weights = {"objects": c.weight_objects, "attributes": c.weight_attributes}

    def with_distillation(outputs: dict, context: dict):
        terms, logs = contrastive(outputs, context)
        targets = context["targets"]
        for name in c.names:  # L = L_contrastive + L_CE-obj + L_CE-attr
            terms[f"cd_{name}"] = weights[name] * losses.soft_target_cross_entropy(outputs[f"head/{name}"],
                                                                                   targets[name])
        if e.enabled:
            terms["ed"] = e.weight * losses.embedding_distill_loss(outputs["head/ed_projection"], targets["embedding"])
        return terms, logs
    return with_distillation


def _knowledge_extraction(k: KnowledgeConfig, mode: str, seed: int = 0):
    """The thesis' objective: weight x L_KD + multi-layer InfoNCE (docs/methods.md, "Thesis methods"). CTL
    pushes the batch's teacher vectors into the model's bank after using it (Eq 84-85).

    InfoNCE and CTL are not sums over micro-batches (every row's softmax runs over the batch's columns), so
    gradient accumulation is exact only because the trainer hands this function the whole batch's outputs
    (micro-batches spliced in, `trainer.forward_backward`); the bank is pushed in the step's last call only
    (`context["update_state"]`), so every micro-batch sees the same negatives."""
    ctl_scale = 1 / 0.07 if k.ctl_temperature == "fixed" else 1.0

    def knowledge_extraction(outputs: dict, context: dict):
        terms, logs = {"contrastive": thesis_objectives.contrastive_term(outputs, mode)}, {}
        if k.itm.negatives != "off":
            itm, logs["itm/acc"] = thesis_objectives.itm_term(outputs, k.itm.negatives, seed, context["step"])
            terms["itm"] = k.itm.weight * itm
        target = context["targets"][k.target]
        image, text = outputs["image_head"], outputs["text_head"]
        if k.kind == "shre":
            kd = losses.shre_kd_loss(image, text, target)
        elif k.kind == "ssmke":
            kd = losses.ssmke_mse_loss(image, text, target)
        elif k.kind == "tcmli":
            image_term, text_term = losses.tcmli_loss(outputs["image_tokens"], outputs["text_tokens"],
                                                      outputs["text_keep"], target, outputs["tcmli_projection"],
                                                      form=k.tcmli_form)
            terms["kd_image"], terms["kd_text"] = k.weight * image_term / 2, k.weight * text_term / 2
            return terms, {}
        else:
            teacher, bank = F.normalize(target, dim=-1), outputs.get("bank")
            kd = losses.ctl_kd_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), teacher, ctl_scale,
                                    bank=None if bank is None else bank.negatives(), distributed=mode)
            if bank is not None and context.get("update_state", True):  # once per step under accumulation
                bank.push(teacher, distributed=mode)
        terms[f"kd_{k.kind}"] = k.weight * kd
        return terms, logs
    return knowledge_extraction


def _contrastive_loss(loss: LossConfig, mode: str, seed: int, distill: DistillConfig):
    if loss.name == "infonce" and distill.distribution.enabled:
        d = distill.distribution

        def distribution_distillation(outputs: dict, context: dict):
            value = losses.distribution_distill_loss(
                outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                context["targets"]["distribution"], lam=d.lam, temperature=d.temperature, distributed=mode)
            return {"contrastive": value}, {}
        return distribution_distillation

    if loss.name == "infonce":
        def infonce(outputs: dict, context: dict):
            return {"contrastive": losses.clip_loss(outputs["image_features"], outputs["text_features"],
                                             outputs["logit_scale"], distributed=mode)}, {}
        return infonce

    if loss.name == "hn_nce":
        h = loss.hn_nce

        def hard_negatives(outputs: dict, context: dict):
            value = losses.hn_nce_loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                                alpha=h.alpha, beta=h.beta, detach_weights=h.detach_weights, distributed=mode)
            return {"hn_nce": value}, {}
        return hard_negatives

    p = loss.psd

    def progressive_self_distillation(outputs: dict, context: dict):
        alpha = alpha_at(context["step"], context["total_steps"], p.alpha_schedule, p.alpha_start, p.alpha_end,
                         hold=p.alpha_hold)
        mask = aligned_mask(context["indices"], alpha, seed=seed, epoch=context["epoch"], partition=p.partition)
        value = losses.psd_loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"], alpha,
                         mask.to(outputs["image_features"].device), teacher_temperature=p.teacher_temperature,
                         prediction=p.prediction, detach_targets=p.detach_targets, distributed=mode)
        diagnostics = losses.psd_target_diagnostics(outputs["image_features"].detach(),
                                                    outputs["text_features"].detach(), mask,
                                                    p.teacher_temperature, p.prediction)
        return {"psd": value}, {"psd/alpha": alpha, "psd/aligned_fraction": float(mask.float().mean()), **diagnostics}
    return progressive_self_distillation


# ------------------------------------------------------------------------- teachers and the image tower

def teacher_targets_from_config(cfg: ExperimentConfig, model, data_root: Path, device: torch.device,
                                source=None) -> TeacherTargets | None:
    """Open the teacher cache (or load the teacher for online targets), add the heads the enabled losses
    need to `model` (concept heads, the ED projection), and return the per-batch `TeacherTargets`.
    `source`: the training source, whose sample keys a cache must match."""
    d = cfg.distill
    if not d.enabled:
        return None
    from alignlab.data.transforms import CLIP_MEAN, CLIP_STD
    from alignlab.training.teacher_targets import open_teacher_source

    names = d.needed_targets()
    cache, teacher = open_teacher_source(d, data_root, device, source=source, image_size=cfg.data.image_size,
                                         train=cfg.data.train)
    sizes = target_sizes(names, cache=cache, teacher=teacher, image_size=cfg.data.image_size, device=device)
    if cfg.model.student is not None:
        _check_student_width(cfg, sizes)
        thesis_objectives.attach_thesis_modules(model, d.knowledge)  # first: the momentum copy is of the bare student
        if d.knowledge.kind == "tcmli":  # g: 768 -> 32 in the thesis, shared by both sides
            model.attach_tcmli(torch.nn.Linear(cfg.model.student.out_dim, d.knowledge.tcmli_dim))
        if d.knowledge.kind == "ctl" and d.knowledge.bank_size:
            model.attach_bank(losses.TeacherMemoryBank(d.knowledge.bank_size, sizes["embedding"],
                                                       init=d.knowledge.bank_init, seed=cfg.seed))
    else:
        model.add_heads({name: sizes[name] for name in d.concepts.names})
    if d.embedding.enabled:
        model.add_heads({"ed_projection": sizes["embedding"]})
    project = None
    if d.distribution.enabled:
        project = _teacher_projection(d.distribution.teacher_projection, model, sizes["embedding"])
    return TeacherTargets(names, cache=cache, teacher=teacher, k=d.concepts.k, input_mean=CLIP_MEAN,
                          input_std=CLIP_STD, project=project)


def _check_student_width(cfg: ExperimentConfig, sizes: dict[str, int]) -> None:
    """Every KD loss compares h3 with the teacher's target itself (logits, or the CLS vector): one width."""
    k, out_dim = cfg.distill.knowledge, cfg.model.student.out_dim
    if sizes[k.target] != out_dim:
        raise ConfigError(f"model.student.out_dim={out_dim} but the teacher's {k.target} has width "
                          f"{sizes[k.target]}: set model.student.out_dim={sizes[k.target]}")


def _teacher_projection(kind: str, model, width: int):
    """DD: the teacher embedding in the student's shared space (see DistributionDistillConfig)."""
    if kind == "image_proj":
        if width != model.image_proj.in_features:
            raise ValueError(f"distill.distribution.teacher_projection=image_proj needs the teacher embedding width "
                             f"({width}) to equal the image tower's ({model.image_proj.in_features}); use a teacher "
                             "with the student's tower architecture or teacher_projection=identity")
        return model.project_image_features
    if width != model.embed_dim:
        raise ValueError(f"distill.distribution.teacher_projection=identity needs the teacher embedding width "
                         f"({width}) to equal model.embed_dim ({model.embed_dim})")
    return lambda embedding: torch.nn.functional.normalize(embedding, dim=-1)


def param_group_rules(cfg: ExperimentConfig) -> tuple[GroupRule, ...]:
    """Optimizer group rules: concept heads lr x head_lr_scale, wd x head_wd_scale (DiHT); the image tower
    lr x lr_scale in ft / ft_delay (a locked tower has no trainable parameters)."""
    rules = []
    c = cfg.distill.concepts
    if c.names:
        rules.append(GroupRule("concept_heads", tuple(f"heads.{name}" for name in c.names),
                               lr_scale=c.head_lr_scale, wd_scale=c.head_wd_scale))
    if cfg.model.image.mode in ("ft", "ft_delay"):
        rules.append(GroupRule("image_tower", ("image_tower",), lr_scale=cfg.model.image.lr_scale))
    return tuple(rules)


def image_tower_locked_at(image: ImageTowerConfig, step: int, total_steps: int) -> bool:
    """Whether the image tower is locked during optimizer step `step` (0-based): always for LiT, for the
    first round(delay x total_steps) steps with ft_delay, never otherwise."""
    if image.mode == "locked":
        return True
    if image.mode == "ft_delay":
        return step < round(image.delay * total_steps)
    return False
