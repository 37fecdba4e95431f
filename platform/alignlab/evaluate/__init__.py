"""Evaluation suite: retrieval, average median rank, zero-shot, linear probe, effective
robustness and similarity histograms, plus `evaluate_model`, which runs them all on a SynthCaps root."""

from alignlab.evaluate.histograms import similarity_histograms
from alignlab.evaluate.linear_probe import linear_probe
from alignlab.evaluate.retrieval import average_median_rank, retrieval_metrics
from alignlab.evaluate.robustness import effective_robustness, effective_robustness_residual
from alignlab.evaluate.suite import evaluate_model
from alignlab.evaluate.zeroshot import zero_shot_classifier, zero_shot_metrics

__all__ = [
    "average_median_rank",
    "effective_robustness",
    "effective_robustness_residual",
    "evaluate_model",
    "linear_probe",
    "retrieval_metrics",
    "similarity_histograms",
    "zero_shot_classifier",
    "zero_shot_metrics",
]
