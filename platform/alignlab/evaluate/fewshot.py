"""Few-shot linear probes: DiHT's prompt-initialised PGD probe vs a randomly initialised probe (DiHT's few-shot probe).

The probe (DiHT section 4.4, the equation after "for some delta, delta_b > 0"):

    min_{||W||_2 <= delta, ||b||_2 <= delta_b}  mean_i CE(y_i, s * x_i^T (W0 + W) + b)

x_i: L2-normalised image features; W0 [C, d]: the zero-shot prompt classifier (rows = unit class prototypes,
`zero_shot_classifier`); ||W||_2 is the Frobenius norm. Choices made here, each an argument:
- Logit scale s = 1 by default: DiHT's equation has no temperature, logits are x^T (W0 + W) + b. With s = 1
  the cross entropy stays smooth and PGD converges within a few hundred steps; with s = 100 (CLIP's zero-shot
  scale) the loss of a k-shot set saturates, the probe chases the few misclassified examples and, on our
  synthetic checks, converged slower and generalised worse. s scales the predictions of W0 + W and b alike,
  so delta = 0 gives the zero-shot predictions for any s. The mean over examples stands in for DiHT's sum
  (same minimiser).
- Solver: projected gradient descent (DiHT cites PGD [5]) with Nesterov/FISTA momentum and step 1/L, where
  L = lambda_max(A^T A / n) / 2 + weight_decay, A = [s x, 1], bounds the curvature of the mean CE (softmax
  Hessian <= 1/2). After every step W and b are projected onto their balls: W *= min(1, delta / ||W||).
- "random" init is DiHT's baseline ("linear probes from scratch", weight decay found by grid search): no
  prompt prior (W0 = 0), W and b drawn like torch.nn.Linear (uniform +-1/sqrt(d)) from `seed`, no ball,
  L2 weight decay (weight_decay / 2) ||W||^2 on W only, bias unpenalised as in CLIP's logistic-regression
  probe. The weight-decayed objective is convex with a unique W, so a converged probe does not depend on the
  random start: "random" means "without the prompt prior".
- Grids (DiHT: "delta and delta_b ... and weight decay for the baseline ... are found using grid search"; the
  paper gives no values): delta = r * ||W0||_F, r in DELTA_FRACTIONS (r = average drift per class prototype;
  r = 0 is the zero-shot classifier itself, so the search can always fall back on it); delta_b = beta * s *
  sqrt(C), beta in BIAS_FRACTIONS (average bias per class in cosine units); weight decay in WEIGHT_DECAYS.
  Choices are made on the classification set's val split, never on test; the probe is fit on the k-shot set
  only. Ties go to the strongest regularisation (smallest delta, then delta_b; largest weight decay).
- k-shot sets: k images per class drawn by `seed`; for one seed the sets are nested (k=1 within k=2 ...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from alignlab.evaluate.datasets import load_class_folders
from alignlab.evaluate.retrieval import as_feature_matrix
from alignlab.evaluate.suite import encode_images
from alignlab.evaluate.zeroshot import zero_shot_classifier, zero_shot_metrics

INITS = ("prompt", "random")
DEFAULT_KS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_STEPS = 300
DEFAULT_LOGIT_SCALE = 1.0  # DiHT 4.4: logits x^T (W + W0) + b, no temperature
DELTA_FRACTIONS = (0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
BIAS_FRACTIONS = (0.0, 0.03, 0.1, 0.3)
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FEW_SHOT_JSON = "fewshot.json"
FEW_SHOT_PNG = "fewshot.png"


def sample_k_shot(labels, k: int, seed: int, num_classes: int | None = None) -> Tensor:
    """Indices of k examples per class, drawn without replacement by `seed` (sorted, class by class).

    Each class's examples are shuffled by one permutation that depends only on (seed, labels), and the first
    k are taken, so the k-shot sets of one seed are nested. With num_classes every class in
    range(num_classes) must be present; otherwise the classes are those that occur in labels.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.dtype.is_floating_point or labels.numel() == 0 or labels.min() < 0:
        raise ValueError("labels must be a non-empty list of non-negative integer class indices")
    if k < 1:
        raise ValueError(f"k must be >= 1 (examples per class), got {k}")
    classes = range(num_classes) if num_classes is not None else labels.unique().tolist()
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        if len(members) < k:
            raise ValueError(f"class {c} has {len(members)} examples, fewer than k={k}; lower k or add "
                             "training images for that class")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]].sort().values)
    return torch.cat(chosen)


def project_to_ball(batch: Tensor, radii: Tensor) -> Tensor:
    """Project each batch[g] onto {||v||_2 <= radii[g]} (Frobenius norm over the other dims):
    batch[g] * min(1, radii[g] / ||batch[g]||). An infinite radius leaves batch[g] unchanged."""
    norms = batch.flatten(1).norm(dim=1)
    scale = torch.where(norms > radii, radii / norms, torch.ones_like(norms))
    return batch * scale.reshape(-1, *[1] * (batch.ndim - 1))


def _features_and_labels(x, y, num_classes: int, name: str) -> tuple[Tensor, Tensor]:
    x = as_feature_matrix(x, f"{name}_x").float()
    y = torch.as_tensor(y, dtype=torch.long, device=x.device).reshape(-1)
    if len(y) != len(x) or len(x) == 0:
        raise ValueError(f"{name}: need one label per feature row and at least one row, got {len(x)} rows and "
                         f"{len(y)} labels")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{name}_y must lie in [0, {num_classes}) (the rows of zero_shot_weights)")
    return x, y


def _probe_problem(train_x, train_y, zero_shot_weights) -> tuple[Tensor, Tensor, Tensor]:
    W0 = as_feature_matrix(zero_shot_weights, "zero_shot_weights").float()
    x, y = _features_and_labels(train_x, train_y, W0.shape[0], "train")
    if x.shape[1] != W0.shape[1]:
        raise ValueError(f"train_x has dimension {x.shape[1]} but zero_shot_weights {W0.shape[1]}")
    return x, y, W0.to(x.device)


def _radii(values: Sequence[float | None], name: str) -> Tensor:
    if any(value is not None and not value >= 0 for value in values):
        raise ValueError(f"{name} must be >= 0 (a ball radius) or None for no constraint, got {list(values)}")
    return torch.tensor([math.inf if value is None else float(value) for value in values])


def _fit_probes(x: Tensor, y: Tensor, W0: Tensor, init: str, deltas: Tensor, delta_bs: Tensor,
                weight_decays: Tensor, steps: int, lr: float | None, seed: int,
                logit_scale: float) -> tuple[Tensor, Tensor]:
    """Fit G probes at once (one per entry of deltas / delta_bs / weight_decays); [G, C, d] and [G, C].

    All G share the data, the start and the momentum schedule; batching them turns a grid search into one
    loop of batched matrix products instead of G loops of tiny ones.
    """
    if steps < 1 or not logit_scale > 0 or (lr is not None and not lr > 0):
        raise ValueError(f"need steps >= 1, logit_scale > 0 and lr > 0 (or None), got steps={steps}, "
                         f"logit_scale={logit_scale}, lr={lr}")
    if not bool((weight_decays >= 0).all()):
        raise ValueError(f"weight decay must be >= 0, got {weight_decays.tolist()}")
    (n, d), num_classes, grid = x.shape, W0.shape[0], len(deltas)
    device = x.device
    if init == "prompt":
        base, W, b = W0, torch.zeros(grid, num_classes, d, device=device), torch.zeros(grid, num_classes, device=device)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(d)
        base = torch.zeros_like(W0)
        W = ((torch.rand(num_classes, d, generator=generator) * 2 - 1) * bound).expand(grid, -1, -1).to(device)
        b = ((torch.rand(num_classes, generator=generator) * 2 - 1) * bound).expand(grid, -1).to(device)
    scaled_x = logit_scale * x
    augmented = torch.cat([scaled_x, torch.ones(n, 1, device=device)], dim=1)
    weight_decays, deltas, delta_bs = weight_decays.to(device), deltas.to(device), delta_bs.to(device)
    curvature = float(torch.linalg.matrix_norm(augmented, ord=2)) ** 2 / n / 2 + weight_decays
    step = (1.0 / curvature if lr is None else torch.full_like(curvature, lr))[:, None]
    onehot = F.one_hot(y, num_classes).float()

    W_prev, b_prev, t = W, b, 1.0
    for _ in range(steps):
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        momentum = (t - 1.0) / t_next
        W_look, b_look = W + momentum * (W - W_prev), b + momentum * (b - b_prev)
        # Gradient of mean CE: residual (softmax - onehot) / n, chained through logits = scaled_x W^T + b.
        logits = scaled_x @ (base + W_look).transpose(1, 2) + b_look[:, None, :]
        residual = (torch.softmax(logits, dim=2) - onehot) / n
        grad_W = residual.transpose(1, 2) @ scaled_x + weight_decays[:, None, None] * W_look
        W_prev, b_prev, t = W, b, t_next
        W = project_to_ball(W_look - step[:, :, None] * grad_W, deltas)
        b = project_to_ball(b_look - step * residual.sum(1), delta_bs)
    return base + W, b


def pgd_probe(train_x, train_y, zero_shot_weights, *, delta: float | None = None, delta_b: float | None = None,
              init: str = "prompt", steps: int = DEFAULT_STEPS, lr: float | None = None, seed: int = 0,
              logit_scale: float = DEFAULT_LOGIT_SCALE, weight_decay: float = 0.0) -> tuple[Tensor, Tensor]:
    """Fit the few-shot probe of the module docstring; return (weight, bias) with weight = W0 + W [C, d].

    Predict with argmax(logit_scale * x @ weight.T + bias). init="prompt": W and b start at 0 (the zero-shot
    classifier) and stay in the balls ||W|| <= delta, ||b|| <= delta_b (None = no ball). init="random": W0 = 0
    (zero_shot_weights only gives C and d), a seeded random start, no ball (delta must stay None; regularise
    with weight_decay). weight_decay penalises the offset W in either init, so with init="prompt" it gives the
    "naive L2 penalty" towards the prompt that DiHT contrasts PGD with. lr=None takes the step 1/L of the
    module docstring; `seed` only matters for init="random".
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "random" and (delta is not None or delta_b is not None):
        raise ValueError("init='random' trains DiHT's unconstrained baseline: leave delta and delta_b None and "
                         "regularise it with weight_decay")
    x, y, W0 = _probe_problem(train_x, train_y, zero_shot_weights)
    weight, bias = _fit_probes(x, y, W0, init, _radii([delta], "delta"), _radii([delta_b], "delta_b"),
                               torch.tensor([float(weight_decay)]), steps, lr, seed, logit_scale)
    return weight[0], bias[0]


def _fit_grid(x: Tensor, y: Tensor, W0: Tensor, init: str, deltas: Tensor, delta_bs: Tensor,
              weight_decays: Tensor, **options) -> list[tuple[Tensor, Tensor]]:
    """_fit_probes over a grid in chunks, so that the [G, n, C] logits stay below ~2^25 floats (128 MB)."""
    chunk = max(1, 2**25 // (len(x) * W0.shape[0]))
    fits = []
    for start in range(0, len(deltas), chunk):
        part = slice(start, start + chunk)
        weights, biases = _fit_probes(x, y, W0, init, deltas[part], delta_bs[part], weight_decays[part], **options)
        fits.extend(zip(weights, biases))
    return fits


def _top1(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, logit_scale: float) -> float:
    return 100.0 * float(((logit_scale * x @ weight.T + bias).argmax(1) == y).double().mean())


def delta_grid(zero_shot_weights, logit_scale: float = DEFAULT_LOGIT_SCALE,
               delta_fractions: Sequence[float] = DELTA_FRACTIONS,
               bias_fractions: Sequence[float] = BIAS_FRACTIONS) -> tuple[list[float], list[float]]:
    """Absolute radii from the relative grids: delta = r ||W0||_F, delta_b = beta * logit_scale * sqrt(C)."""
    W0 = as_feature_matrix(zero_shot_weights, "zero_shot_weights")
    if not delta_fractions or not bias_fractions or min(*delta_fractions, *bias_fractions) < 0:
        raise ValueError("delta_fractions and bias_fractions must be non-empty lists of values >= 0")
    norm, bias_unit = float(W0.norm()), logit_scale * math.sqrt(W0.shape[0])
    return [r * norm for r in delta_fractions], [beta * bias_unit for beta in bias_fractions]


def _best(candidates: list[dict], fits: list[tuple[Tensor, Tensor]], val_x: Tensor, val_y: Tensor,
          logit_scale: float) -> dict:
    """The candidate with the highest val top-1; candidates come ordered strongest regularisation first, so
    the first maximum breaks ties towards it."""
    scores = [_top1(val_x, val_y, weight, bias, logit_scale) for weight, bias in fits]
    best = int(np.argmax(scores))
    weight, bias = fits[best]
    return {**candidates[best], "val_top1": scores[best], "weight": weight, "bias": bias}


def select_deltas(train_x, train_y, val_x, val_y, zero_shot_weights, *, deltas: Sequence[float],
                  delta_bs: Sequence[float], steps: int = DEFAULT_STEPS, lr: float | None = None,
                  logit_scale: float = DEFAULT_LOGIT_SCALE) -> dict:
    """Grid search of the prompt-initialised probe: fit on train for every (delta, delta_b), keep the best
    val top-1; ties go to the smallest delta, then the smallest delta_b (closest to zero-shot).
    Returns {"delta", "delta_b", "val_top1", "weight", "bias"}."""
    if not deltas or not delta_bs:
        raise ValueError("deltas and delta_bs must be non-empty grids")
    x, y, W0 = _probe_problem(train_x, train_y, zero_shot_weights)
    val_x, val_y = _features_and_labels(val_x, val_y, W0.shape[0], "val")
    candidates = [{"delta": float(delta), "delta_b": float(delta_b)}
                  for delta in sorted(deltas) for delta_b in sorted(delta_bs)]
    fits = _fit_grid(x, y, W0, "prompt", _radii([c["delta"] for c in candidates], "delta"),
                     _radii([c["delta_b"] for c in candidates], "delta_b"), torch.zeros(len(candidates)),
                     steps=steps, lr=lr, seed=0, logit_scale=logit_scale)
    return _best(candidates, fits, val_x.to(x.device), val_y.to(x.device), logit_scale)


def select_weight_decay(train_x, train_y, val_x, val_y, zero_shot_weights, *, weight_decays: Sequence[float],
                        steps: int = DEFAULT_STEPS, lr: float | None = None, seed: int = 0,
                        logit_scale: float = DEFAULT_LOGIT_SCALE) -> dict:
    """Grid search of the random-init baseline over weight decay on val; ties go to the largest weight decay.
    Returns {"weight_decay", "val_top1", "weight", "bias"}."""
    if not weight_decays:
        raise ValueError("weight_decays must be a non-empty grid")
    x, y, W0 = _probe_problem(train_x, train_y, zero_shot_weights)
    val_x, val_y = _features_and_labels(val_x, val_y, W0.shape[0], "val")
    candidates = [{"weight_decay": float(w)} for w in sorted(weight_decays, reverse=True)]
    unconstrained = _radii([None] * len(candidates), "delta")
    fits = _fit_grid(x, y, W0, "random", unconstrained, unconstrained,
                     torch.tensor([c["weight_decay"] for c in candidates]), steps=steps, lr=lr, seed=seed,
                     logit_scale=logit_scale)
    return _best(candidates, fits, val_x.to(x.device), val_y.to(x.device), logit_scale)


def few_shot_curve(train_x, train_y, val_x, val_y, test_x, test_y, zero_shot_weights,
                   ks: Sequence[int] = DEFAULT_KS, seeds: Sequence[int] = DEFAULT_SEEDS, *,
                   delta_fractions: Sequence[float] = DELTA_FRACTIONS,
                   bias_fractions: Sequence[float] = BIAS_FRACTIONS,
                   weight_decays: Sequence[float] = WEIGHT_DECAYS, steps: int = DEFAULT_STEPS,
                   logit_scale: float = DEFAULT_LOGIT_SCALE) -> dict:
    """Test top-1 of both probes for every k, over k-shot sets drawn by each seed (DiHT's few-shot protocol).

    Returns a JSON-ready dict: "zero_shot" {"k": 0, "top1"} (the k = 0 point), "ks", "seeds", "logit_scale",
    "steps", "grid" {"delta", "delta_b", "weight_decay"} (absolute values searched) and, for "prompt" and
    "random", one entry per k: {"k", "top1_mean", "top1_std" (population std over seeds), "top1",
    "val_top1" and the chosen "delta" and "delta_b" (prompt) or "weight_decay" (random), lists over seeds}.
    """
    if not ks or not seeds:
        raise ValueError("ks and seeds must be non-empty lists")
    W0 = as_feature_matrix(zero_shot_weights, "zero_shot_weights").float()
    num_classes = W0.shape[0]
    train_x, train_y = _features_and_labels(train_x, train_y, num_classes, "train")
    test_x, test_y = _features_and_labels(test_x, test_y, num_classes, "test")
    deltas, delta_bs = delta_grid(W0, logit_scale, delta_fractions, bias_fractions)
    curve = {"zero_shot": {"k": 0, "top1": zero_shot_metrics(test_x, W0, test_y)["top1"]},
             "ks": [int(k) for k in ks], "seeds": [int(s) for s in seeds], "logit_scale": float(logit_scale),
             "steps": int(steps), "grid": {"delta": deltas, "delta_b": delta_bs,
                                           "weight_decay": [float(w) for w in weight_decays]},
             "prompt": [], "random": []}
    for k in curve["ks"]:
        runs = {init: [] for init in INITS}
        for seed in curve["seeds"]:
            index = sample_k_shot(train_y.cpu(), k, seed, num_classes=num_classes).to(train_x.device)
            x, y = train_x[index], train_y[index]
            runs["prompt"].append(select_deltas(x, y, val_x, val_y, W0, deltas=deltas, delta_bs=delta_bs,
                                                steps=steps, logit_scale=logit_scale))
            runs["random"].append(select_weight_decay(x, y, val_x, val_y, W0, weight_decays=weight_decays,
                                                      steps=steps, seed=seed, logit_scale=logit_scale))
        for init, chosen in runs.items():
            top1 = [_top1(test_x, test_y, run["weight"], run["bias"], logit_scale) for run in chosen]
            entry = {"k": k, "top1_mean": float(np.mean(top1)), "top1_std": float(np.std(top1)), "top1": top1,
                     "val_top1": [run["val_top1"] for run in chosen]}
            for key in ("delta", "delta_b") if init == "prompt" else ("weight_decay",):
                entry[key] = [run[key] for run in chosen]
            curve[init].append(entry)
    return curve


def plot_few_shot_curve(curve: dict, out_png, title: str = "few-shot linear probe") -> None:
    """Test top-1 vs k on a log2 axis, mean +- std over seeds for both inits; zero-shot is drawn at the
    tick "0" (one octave left of k = 1) and as a dotted horizontal reference line."""
    # A bare Figure with an explicit Agg canvas: no pyplot global state, no GUI backend.
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    zero_shot_x = min(entry["k"] for entry in curve["prompt"]) / 2.0
    for init, label in (("random", "random init"), ("prompt", "prompt init (PGD)")):
        entries = curve[init]
        axes.errorbar([e["k"] for e in entries], [e["top1_mean"] for e in entries],
                      yerr=[e["top1_std"] for e in entries], marker="o", capsize=3, label=label)
    axes.axhline(curve["zero_shot"]["top1"], color="gray", linestyle=":", label="zero-shot")
    axes.plot([zero_shot_x], [curve["zero_shot"]["top1"]], marker="*", markersize=12, color="black",
              linestyle="none")
    ks = [entry["k"] for entry in curve["prompt"]]
    axes.set_xscale("log", base=2)
    axes.set_xticks([zero_shot_x, *ks], ["0", *(str(k) for k in ks)])
    axes.set_xlabel("examples per class k (0 = zero-shot)")
    axes.set_ylabel("test top-1 (%)")
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png")


def evaluate_few_shot(model, tokenizer: Callable, image_transform: Callable, data_root, out_dir,
                      task: str = "shape_color", ks: Sequence[int] = DEFAULT_KS,
                      seeds: Sequence[int] = DEFAULT_SEEDS, batch_size: int = 256, device="cpu",
                      steps: int = DEFAULT_STEPS, logit_scale: float = DEFAULT_LOGIT_SCALE) -> dict:
    """Few-shot curve on `data_root/classification/<task>/{train,val,test}` (docs/data-formats.md layout).

    Images are encoded once per split (model in eval mode, restored afterwards), W0 is the prompt-ensembled
    zero-shot classifier from classes.json; the probes are fit on `device`. Writes out_dir/fewshot.json ({"task", "metrics", "curve"}) and
    out_dir/fewshot.png; returns flat metrics `fewshot/<task>/zero_shot/top1` and
    `fewshot/<task>/<prompt|random>/k=<k>/{top1,top1_std}`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root, out_dir = Path(data_root) / "classification" / task, Path(out_dir)
    absent = [str(root / split) for split in ("train", "val", "test") if not (root / split).is_dir()]
    if absent:
        raise FileNotFoundError(f"few-shot task {task!r} needs the folders {', '.join(absent)} "
                                "(generate SynthCaps or pick another task)")
    was_training = model.training
    model.eval()
    try:
        splits = {}
        for split in ("train", "val", "test"):
            paths, labels, classnames, templates = load_class_folders(root, split)
            # The probes run where the model does: on a GPU the whole grid search takes seconds.
            splits[split] = (encode_images(model, paths, image_transform, batch_size, device).to(device), labels)
        classifier = zero_shot_classifier(model.encode_text, tokenizer, classnames, templates, device=device)
    finally:
        model.train(was_training)

    curve = few_shot_curve(*splits["train"], *splits["val"], *splits["test"], classifier, ks, seeds,
                           steps=steps, logit_scale=logit_scale)
    metrics = {f"fewshot/{task}/zero_shot/top1": curve["zero_shot"]["top1"]}
    for init in INITS:
        for entry in curve[init]:
            metrics[f"fewshot/{task}/{init}/k={entry['k']}/top1"] = entry["top1_mean"]
            metrics[f"fewshot/{task}/{init}/k={entry['k']}/top1_std"] = entry["top1_std"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FEW_SHOT_JSON).write_text(json.dumps({"task": task, "metrics": metrics, "curve": curve}, indent=2))
    plot_few_shot_curve(curve, out_dir / FEW_SHOT_PNG, title=f"few-shot {task}")
    return metrics
