"""Checked field types that several settings models share (the experiment config and the task sections)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _check_crop_scale(value: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 < value[0] <= value[1] <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(value)}")
    return value


def _check_betas(value: tuple[float, float]) -> tuple[float, float]:
    if not all(0.0 <= beta < 1.0 for beta in value):
        raise ValueError(f"each beta must be in [0, 1), got {list(value)} (AdamW's usual: [0.9, 0.98])")
    return value


CropScale = Annotated[tuple[float, float], AfterValidator(_check_crop_scale)]
"""The (low, high) area fraction of a random resized crop."""

AdamBetas = Annotated[tuple[float, float], AfterValidator(_check_betas)]
"""Adam / AdamW (beta1, beta2), each in [0, 1)."""
