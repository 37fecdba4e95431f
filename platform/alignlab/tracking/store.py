"""Where runs are stored: the tracking URI, experiments, and which errors mean "the store is down".

Tracking store: the `tracking_uri` argument, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`
(MLflow 3's own default, made absolute; the file store is deprecated in MLflow 3). View it with
`mlflow ui --backend-store-uri sqlite:///<cwd>/mlflow.db`. Experiments created here on a sqlite store keep
their artifacts next to the database, in `<db folder>/mlartifacts/<experiment slug>`, rather than in
MLflow's cwd-relative `./mlruns`, so the store and its artifacts travel together.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from alignlab.redaction import redact

# Error codes of a request the store understood and refused: sending it again cannot help.
REJECTED_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                            "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST"})


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The store to use: the argument, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    if tracking_uri:
        return tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """Database file of a `sqlite:///path` URI (None for other stores and in-memory sqlite)."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri.endswith(":memory:"):
        return None
    return Path(unquote(tracking_uri[len("sqlite:///"):].split("?")[0])).resolve()


def is_outage(err: BaseException) -> bool:
    """Whether `err` from a store call means "not reachable now" (try again later) rather than "refused".

    Connection and timeout errors, HTTP 5xx and MLflow's INTERNAL_ERROR (what the REST client raises when the
    server does not answer) are outages; a bad request, a missing run or a missing local file is not."""
    if isinstance(err, MlflowException):
        return err.error_code not in REJECTED_CODES
    return not isinstance(err, (FileNotFoundError, ValueError, TypeError, KeyError))


def experiment_id(client: MlflowClient, tracking_uri: str, experiment: str) -> str:
    """Id of `experiment`, creating it (artifacts under the sqlite store's folder) when missing."""
    if not experiment or not isinstance(experiment, str):
        raise ValueError(f"experiment must be a non-empty string, got {experiment!r}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        db_path = sqlite_path(tracking_uri)
        location = None
        if db_path is not None:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-.") or "experiment"
            location = (db_path.parent / "mlartifacts" / slug).as_uri()
        try:
            return client.create_experiment(experiment, artifact_location=location)
        except MlflowException:
            found = client.get_experiment_by_name(experiment)  # another process created it meanwhile
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise ValueError(f"experiment {experiment!r} in {redact(tracking_uri)} is deleted; restore it "
                         f"(MlflowClient.restore_experiment) or pick another experiment name")
    return found.experiment_id
