"""Experiment tracking: MLflow runs through explicit run ids, delivered in the background and spooled in the
run folder while the store is down, and final/best summaries of metric histories."""

from alignlab.tracking.mlflow_tracker import (
    METRIC_NAME_TAG_PREFIX,
    TAG_ABLATION,
    TAG_ARM,
    TAG_DATASET_HASH,
    TAG_GIT_COMMIT,
    TAG_SEED,
    TAG_TRUNCATED_PARAMS,
    RunTracker,
    find_runs,
    get_run,
    flatten_params,
    git_commit,
    sanitise_metric_name,
    standard_tags,
)
from alignlab.tracking.spool import RUN_ID_FILE, replay_spool
from alignlab.tracking.store import resolve_tracking_uri
from alignlab.tracking.summary import lower_is_better_by_name, summarise_history

__all__ = [
    "METRIC_NAME_TAG_PREFIX", "RUN_ID_FILE", "TAG_ABLATION", "TAG_ARM", "TAG_DATASET_HASH",
    "TAG_GIT_COMMIT", "TAG_SEED", "TAG_TRUNCATED_PARAMS", "RunTracker", "find_runs", "flatten_params", "get_run", "git_commit",
    "lower_is_better_by_name", "replay_spool", "resolve_tracking_uri", "sanitise_metric_name", "standard_tags",
    "summarise_history",
]
