"""The training recipe: setup -> train -> save_checkpoint, read top to bottom.

Exact resume: the data order is a pure function of (seed, epoch), augmentations of per-sample seeds,
and a checkpoint holds model, optimizer, scheduler, scaler, RNG states and the position in the epoch,
so `resume=True` continues with the same batches and the same losses as an uninterrupted run.

Failure handling: a non-finite loss or gradient norm raises DivergenceError (`guard.py`) before anything
non-finite is saved; a resume with a config other than the checkpoint's is refused unless
`allow_config_change` (`resume.py`); metrics.jsonl never repeats a step and tolerates a torn last line, and
temporary files of a killed checkpoint write are removed on start.

Gradient accumulation splits each rank's batch into micro-batches without changing the loss: features
of all micro-batches are first computed without gradient, then each micro-batch is recomputed with
gradient and spliced into that cached set (as open_clip's `accum_freq`), so the contrastive loss
still sees every negative of the full batch. That makes it exact for any loss of the batch's rows, batch
statistics included (InfoNCE, CTL against the batch's and the bank's teacher vectors, the KD batch means),
provided each row's output depends on its own input only (no BatchNorm, no dropout: the cached and the live
pass would differ) and the loss's state changes once per step (`context["update_state"]`: the bank's push).

Distillation (docs/methods.md "DiHT concept distillation") adds two things per batch: the teacher targets
(`TeacherTargets`, from a cache joined
on sample indices or from the teacher online) go into the loss context, and the image tower is locked or
unlocked for the step (LiT, FT-delay) as a pure function of the step, so resume stays exact.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from alignlab.config import ConfigError, ExperimentConfig, config_to_dict
from alignlab.data.dataset import ResumableBatchSampler, loader_for_sampler
from alignlab.data.skips import SkipTracker
from alignlab.redaction import redact
from alignlab.yaml12 import dump_yaml
from alignlab.training import builders, task_builders
from alignlab.data.roots import resolve_data_root
from alignlab.training.checkpoint import (
    atomic_torch_save,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_partial_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from alignlab.training.distributed import DistInfo, all_reduce_mean, barrier, compute_threads, init_distributed
from alignlab.training.guard import DivergenceGuard
from alignlab.training.prometheus_exporter import training_exporter
from alignlab.training.optim import build_optimizer, build_scheduler, warmup_steps_for
from alignlab.training.selection import EpochSelector, Scorer
from alignlab.training.resume import (
    CONFIG_HISTORY_FILE,
    ConfigChange,
    check_config_changes,
    config_changes,
    record_config_changes,
)

MetricsCallback = Callable[[dict[str, float], int], None]
ConfigChangeCallback = Callable[[int, list[ConfigChange]], None]


@dataclass
class TrainerOutput:
    """What `train` returns in its process: the full step history and the model (the run-level summary a
    pipeline step hands on is `experiment.TrainOutcome`)."""

    steps: int
    history: list[dict] = field(default_factory=list)
    final_checkpoint: Path | None = None
    model: torch.nn.Module | None = None
    config_changes: list[ConfigChange] = field(default_factory=list)  # resumed with --allow-config-change
    skipped_steps: int = 0  # non-finite steps skipped (train.skip_nonfinite_steps)


def _autocast(precision: str, device: torch.device):
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else (
            "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16")
    if precision == "fp32":
        return precision, contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return precision, lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _micro_batches(tensors: tuple[torch.Tensor, ...], parts: int):
    if parts == 1:
        return [tensors]
    if tensors[0].shape[0] % parts:
        raise ValueError(f"per-rank batch {tensors[0].shape[0]} is not divisible by "
                         f"train.accumulation_steps={parts}")
    return list(zip(*(t.chunk(parts) for t in tensors)))


def forward_backward(model, loss_fn, images, tokens, context, *, accumulation: int, autocast, scaler) -> dict:
    """Forward/backward for one optimizer step; returns the named loss terms (detached) and the logs."""
    if accumulation == 1:
        with autocast():
            outputs = model(images, tokens)
            terms, logs = loss_fn(outputs, context)
        scaler.scale(sum(terms.values())).backward()
        return _step_record(terms, logs, outputs)

    micro = _micro_batches((images, tokens), accumulation)
    with torch.no_grad(), autocast():
        cached = [model(im, tok) for im, tok in micro]
    sync = getattr(model, "no_sync", contextlib.nullcontext)
    last = len(micro) - 1
    for j, (im, tok) in enumerate(micro):
        with (contextlib.nullcontext() if j == last else sync()), autocast():
            live = model(im, tok)
            outputs = {name: _splice([live[name] if i == j else c[name] for i, c in enumerate(cached)])
                       for name in live if name not in _ONCE}
            # The logit scales must receive their gradient once, not once per micro-batch.
            outputs |= {name: live[name] if j == 0 else live[name].detach() for name in _ONCE if name in live}
            # A loss with state (the thesis' teacher memory bank) updates it once per optimizer step.
            terms, logs = loss_fn(outputs, context | {"update_state": j == last})
        scaler.scale(sum(terms.values())).backward()
        if j == 0:
            first = _step_record(terms, logs, outputs | {"logit_scale": live["logit_scale"]})
    return first


_ONCE = ("logit_scale", "logit_scales")  # model outputs that are parameters, not one row per pair


def _splice(parts: list):
    """One model output over the whole batch from its per-micro-batch parts: tensors (one row per pair) are
    concatenated, lists and tuples of them (the thesis student's per-layer pairs) element by element; other
    values (a memory bank module, None) are the same in every part."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if isinstance(parts[0], (list, tuple)):
        return type(parts[0])(_splice(list(group)) for group in zip(*parts))
    return parts[0]


def _step_record(terms: dict, logs: dict, outputs: dict) -> dict:
    record = {"loss": sum(v.detach() for v in terms.values())}
    if "logit_scale" in outputs:  # single-modality tasks (unimodal KD, VQ) have neither scale nor pairs
        record |= {"logit_scale": outputs["logit_scale"].detach(),
                   "collapse/image_mean_cos": mean_pairwise_cosine(outputs["image_features"].detach()),
                   "collapse/text_mean_cos": mean_pairwise_cosine(outputs["text_features"].detach())}
    return record | {f"loss/{k}": v.detach() for k, v in terms.items()} | logs


def mean_pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine over the n(n-1) ordered pairs of distinct rows of unit-norm `features` [n, d], in O(nd):
    |sum_i f_i|^2 = n + sum_{i != j} f_i . f_j. Near 1 means every row is the same vector (collapse; the
    contrastive loss then sits at ln n), near 0 a spread-out batch."""
    n = features.shape[0]
    if n < 2:
        return features.new_zeros(())
    total = features.float().sum(dim=0)
    return (total @ total - features.float().pow(2).sum()) / (n * (n - 1))


def duplicate_fraction(tokens: torch.Tensor) -> float:
    """Fraction of a batch's captions that repeat an earlier caption of the batch token for token: InfoNCE
    treats such pairs as negatives of each other, which no model can separate."""
    return 1.0 - torch.unique(tokens, dim=0).shape[0] / max(1, tokens.shape[0])


def train(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = False, allow_config_change: bool = False,
          on_metrics: MetricsCallback | None = None, on_config_change: ConfigChangeCallback | None = None,
          dist_info: DistInfo | None = None, score_epoch: Scorer | None = None) -> TrainerOutput:
    """Train `cfg` into `run_dir` (config.yaml, metrics.jsonl, checkpoints/, final.pt).

    `resume`: continue from the newest checkpoint (from scratch when there is none); a config that differs
    from the checkpoint's is refused unless `allow_config_change` (then recorded in config_history.jsonl and
    passed to `on_config_change(step, changes)`). Raises DivergenceError on a non-finite
    loss or gradient norm (after `train.skip_nonfinite_steps` skipped ones), with nothing non-finite saved.
    `score_epoch(model)`: the validation score of `train.select_by` (`training/selection.py`), given by the
    caller because training does not import evaluation (`alignlab.experiment.val_zero_shot_scorer`)."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    dist = dist_info or init_distributed()
    tcfg = cfg.train
    if tcfg.ranks is not None and tcfg.ranks != dist.world_size:
        raise ConfigError(f"train.ranks={tcfg.ranks} but this run has {dist.world_size} process(es): run it with "
                          f"`alignlab run` (a TorchX job of train.ranks processes) or torchrun --nproc_per_node "
                          f"{tcfg.ranks}, or unset train.ranks")
    if dist.is_main:  # what a killed write left behind (a checkpoint's temporary file is as large as one)
        remove_partial_files(ckpt_dir)
        remove_partial_files(run_dir)

    # ---- setup ---------------------------------------------------------------------------------
    threads = compute_threads(tcfg.threads, cfg.data.num_workers)
    torch.set_num_threads(threads)
    builders.seed_everything(cfg.seed)
    data_root = resolve_data_root(cfg.data)
    tokenizer = builders.tokenizer_from_config(cfg.model, cfg.data, data_root)
    raw_model = task_builders.task_model_from_config(cfg) or builders.model_from_config(cfg.model, tokenizer)
    train_transform, _ = builders.transforms_from_config(cfg.data)
    dataset = builders.train_dataset_from_config(cfg.data, data_root, tokenizer, train_transform)
    # skips.json; past data.max_skip_fraction of corrupt samples the run stops here, or at a checkpoint
    data_skips = SkipTracker(dataset, run_dir, cfg.data.max_skip_fraction, fresh=not resume, write=dist.is_main)
    data_skips.update()
    teacher_targets = builders.teacher_targets_from_config(cfg, raw_model, data_root, dist.device,
                                                           source=dataset.source)  # also adds the heads
    raw_model.to(dist.device)
    if tcfg.channels_last:
        raw_model.image_tower.to(memory_format=torch.channels_last)
    if len(dataset) < tcfg.batch_size:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} is larger than the {len(dataset)} training samples "
                          f"of {redact(str(data_root))}: lower train.batch_size")
    sampler = ResumableBatchSampler(len(dataset), tcfg.batch_size, seed=cfg.seed, rank=dist.rank,
                                    world_size=dist.world_size, drop_last=True)
    steps_per_epoch = len(sampler)
    total_steps = tcfg.max_steps or tcfg.epochs * steps_per_epoch
    image_cfg = cfg.model.image
    raw_model.set_image_tower_locked(image_cfg.mode == "locked")  # LiT: its parameters stay out of the optimizer
    optimizer = build_optimizer(raw_model, raw_model.no_weight_decay_param_names(), lr=tcfg.lr,
                                weight_decay=tcfg.weight_decay, betas=tuple(tcfg.betas), eps=tcfg.eps,
                                rules=builders.param_group_rules(cfg), impl=tcfg.optimizer_impl)
    scheduler = build_scheduler(optimizer, warmup_steps_for(tcfg.warmup, total_steps), total_steps,
                                tcfg.min_lr_ratio)
    precision, autocast = _autocast(tcfg.precision, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "amp_fp16")
    loss_fn = (task_builders.task_loss_from_config(cfg)
               or builders.loss_from_config(cfg.loss, dist.world_size, cfg.seed, cfg.distill))
    selector = None
    if tcfg.select_by is not None:
        if score_epoch is None and dist.is_main:  # only the main rank scores
            raise ConfigError(f"train.select_by={tcfg.select_by} scores every epoch on the val split, which train() "
                              f"needs from its caller: pass score_epoch (alignlab.experiment.val_zero_shot_scorer)")
        selector = EpochSelector(run_dir, f"val/zeroshot/{tcfg.select_by}/top1", score_epoch, is_main=dist.is_main)

    step, epoch, batch_in_epoch = 0, 0, 0
    history, changes = [], []
    if resume and (path := latest_checkpoint(ckpt_dir)) is not None:
        state = load_checkpoint(path)
        changes = config_changes(state["config"], cfg, source=f"config stored in {path}")
        check_config_changes(changes, path, allow_config_change)
        new_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if selector:
            selector.restore(state.get("selection"))
        if changes:  # lr, weight decay, betas per group and the schedule now follow the new config
            for group, new in zip(optimizer.param_groups, new_groups):
                group.update(new)
            scheduler = build_scheduler(optimizer, warmup_steps_for(tcfg.warmup, total_steps), total_steps,
                                        tcfg.min_lr_ratio, start_step=step)
        history = _history_until(_load_history(run_dir / "metrics.jsonl"), step)
        if dist.is_main:
            print(f"[alignlab] resumed from {path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
            # Free to change (train.threads, or data.num_workers through the default), but a CPU sums in
            # another order at another thread count: the resumed run is sound, not bit-identical to an
            # uninterrupted one. Said here and recorded beside the config changes.
            saved_threads = state.get("compute_threads")
            threads_changed = (dist.device.type == "cpu" and saved_threads is not None and saved_threads != threads)
            if threads_changed:
                print(f"[alignlab] compute threads {saved_threads} -> {threads} at step {step}: CPU results from here "
                      f"on differ in rounding from a run that kept {saved_threads} (not bit-identical)")
            record_config_changes(run_dir, step, changes + (
                [ConfigChange("compute_threads", saved_threads, threads)] if threads_changed else []))
            if changes:
                print(f"[alignlab] config changed at step {step}: {', '.join(str(c) for c in changes)}")
                if on_config_change:
                    on_config_change(step, changes)
    elif dist.is_main:  # a fresh start: an earlier run's checkpoints must not be resumed or pruned into this one
        stale = [p for _, p in list_checkpoints(ckpt_dir)] + [
            p for p in (run_dir / "final.pt", run_dir / CONFIG_HISTORY_FILE) if p.exists()]
        for old in stale:
            old.unlink()
        if stale:
            print(f"[alignlab] fresh start in {run_dir}: removed {len(stale)} files of an earlier run "
                  f"({', '.join(p.name for p in stale)})")
        if resume:
            print(f"[alignlab] no checkpoint in {ckpt_dir}: starting from step 0")
    if selector and step == 0:  # a fresh start: an earlier run's selected weights go
        selector.restore(None)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dump_yaml(redact(config_to_dict(cfg))), run_dir / "config.yaml")
    # FT-delay: the tower's parameters get no gradient while locked, which DDP must be told to expect.
    model = (DistributedDataParallel(raw_model, find_unused_parameters=image_cfg.mode == "ft_delay")
             if dist.enabled else raw_model)
    if tcfg.compile:  # checkpoints keep saving raw_model's state dict: no "_orig_mod." prefixes
        model = torch.compile(model)
    _rewrite_history(run_dir / "metrics.jsonl", history, dist.is_main)

    guard = DivergenceGuard(dist.device, tcfg.skip_nonfinite_steps, ckpt_dir, is_main=dist.is_main,
                            advice=f"Lower train.lr (now {tcfg.lr}), check model.init_logit_scale / "
                                   f"max_logit_scale and the loss settings, or set train.skip_nonfinite_steps")

    def terms_at(at_step: int) -> dict:
        return next((h for h in reversed(history) if h["step"] == at_step), {})

    def save(at_step: int) -> Path | None:
        guard.check(terms_at)  # never save a non-finite state
        data_skips.update()
        state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                 "step": at_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "compute_threads": threads,
                 "config": redact(config_to_dict(cfg))} | ({"selection": selector.state_dict()} if selector else {})
        return save_checkpoint(ckpt_dir, at_step, state, tcfg.keep_checkpoints) if dist.is_main else None

    # ---- train ---------------------------------------------------------------------------------
    progress = _progress(tcfg.progress and dist.is_main, total_steps, step, cfg.name)
    exporter = training_exporter(cfg.tracking.prometheus, f"{cfg.name}/seed-{cfg.seed}", tcfg.batch_size,
                                 dist.device, dist.is_main)
    model.train()
    # One loader for the run: the sampler is read in this process at each epoch's iter(), so its workers
    # persist across epochs (no re-fork, no re-opened shards); pinned batches when they go to a GPU.
    loader = loader_for_sampler(dataset, sampler, num_workers=cfg.data.num_workers,
                                pin_memory=dist.device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
    metrics_file = _MetricsFile(run_dir / "metrics.jsonl", dist.is_main)
    while step < total_steps:
        sampler.set_epoch(epoch)
        sampler.set_start_batch(batch_in_epoch)
        step_start = time.perf_counter()  # step_time counts the wait for the batch too (time/data_wait)
        for images, tokens, indices in loader:
            data_wait = time.perf_counter() - step_start
            duplicates = duplicate_fraction(tokens)  # on the loader's CPU tensor: no device sync
            images, tokens = images.to(dist.device, non_blocking=True), tokens.to(dist.device, non_blocking=True)
            if tcfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            locked = builders.image_tower_locked_at(image_cfg, step, total_steps)
            if locked != raw_model.image_tower_locked:
                raw_model.set_image_tower_locked(locked)  # FT-delay: the switch from LiT to FT
            context = {"indices": indices, "epoch": epoch, "step": step, "total_steps": total_steps,
                       "targets": teacher_targets(images, indices) if teacher_targets else {}}
            stats = forward_backward(model, loss_fn, images, tokens, context,
                                     accumulation=tcfg.accumulation_steps, autocast=autocast, scaler=scaler)
            grad_norm = None
            if tcfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip)
            elif not scaler.is_enabled():
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in raw_model.parameters()
                                                           if p.grad is not None])
            bad = guard.observe(step + 1, stats["loss"], None if scaler.is_enabled() else grad_norm)
            if tcfg.skip_nonfinite_steps and guard.skip(bad, step + 1, {k: v for k, v in stats.items()
                                                                       if k.startswith("loss")}):
                if scaler.is_enabled():  # as the scaler does for an overflow: no step, a lower scale
                    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            raw_model.clamp_logit_scale_()
            step += 1
            batch_in_epoch += 1
            epoch_ended = batch_in_epoch == steps_per_epoch
            if epoch_ended:
                epoch, batch_in_epoch = epoch + 1, 0

            record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                      "data/duplicate_caption_frac": duplicates}
            if image_cfg.mode == "ft_delay":
                record["image_tower_locked"] = float(locked)
            if tcfg.skip_nonfinite_steps:
                record["skipped_steps"] = float(guard.skipped)
            tensors = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]  # one collective, one sync
            if tensors:
                means = all_reduce_mean(torch.stack([stats[k].detach().float() for k in tensors])).tolist()
                record |= dict(zip(tensors, means))
            record |= {k: float(v) for k, v in stats.items() if not isinstance(v, torch.Tensor)}
            record |= {"step_time": time.perf_counter() - step_start, "time/data_wait": data_wait}  # after the sync
            if selector and epoch_ended:  # after step_time: the validation is not part of a step's cost
                record |= selector.epoch_end(raw_model, epoch, step, lambda: {
                    "model": raw_model.state_dict(), "config": redact(config_to_dict(cfg))})
            history.append(record)
            metrics_file.append(record)
            if step % tcfg.log_every == 0 or step == total_steps or (selector and epoch_ended):
                guard.check(terms_at)
                if on_metrics:
                    on_metrics({k: v for k, v in record.items() if k != "step"}, step)
            if exporter:
                exporter.observe(record, data_wait_s=data_wait)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", epoch=epoch)
            if (step % tcfg.checkpoint_every == 0 or (selector and epoch_ended)) and step < total_steps:
                save(step)  # after a selection: its state and file are settled together (selection.py)
                if selector:
                    selector.commit()
            if step >= total_steps:
                break
            step_start = time.perf_counter()
    progress.close()
    metrics_file.close()
    if exporter:
        exporter.close()

    # ---- save ------------------------------------------------------------------------------------
    final = None
    save(step)  # every rank: the divergence check before it is collective
    if selector:
        selector.commit()
        if selector.best is None and dist.is_main:
            print(f"[alignlab] train.select_by={tcfg.select_by}: no epoch ended within {step} steps, nothing selected")
    if dist.is_main:
        final = atomic_torch_save({"model": raw_model.state_dict(), "config": redact(config_to_dict(cfg)),
                                   "step": step}, run_dir / "final.pt")
    barrier()
    return TrainerOutput(steps=step, history=history, final_checkpoint=final, model=raw_model,
                       config_changes=changes, skipped_steps=guard.skipped)


# ------------------------------------------------------------------------------------ metrics file

def _load_history(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (a kill during an append) is dropped with a warning."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a JSON row ({line[:60]!r}); delete that line "
                                 f"(or the file, to lose the history) and resume again") from None
            warnings.warn(f"{path}: dropped a torn last line ({line[:60]!r}), left by an interrupted write",
                          stacklevel=2)
    return rows


def _history_until(rows: list[dict], step: int) -> list[dict]:
    """The rows up to the checkpoint's `step`, one per step (the last written wins), in step order."""
    return sorted({h["step"]: h for h in rows if h["step"] <= step}.values(), key=lambda h: h["step"])


def _rewrite_history(path: Path, history: list[dict], is_main: bool) -> None:
    if is_main:
        atomic_write_text("".join(json.dumps(h) + "\n" for h in history), path)


class _MetricsFile:
    """metrics.jsonl, open for the whole run (not reopened per step) on the main rank; each row is flushed to
    the OS as it is written, so a killed run loses no written row (at worst a torn last line)."""

    def __init__(self, path: Path, is_main: bool):
        self._handle = path.open("a") if is_main else None

    def append(self, record: dict) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


class _NoProgress:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)
