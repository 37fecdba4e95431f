"""Credentials written inside URIs never leave the process: the one redaction every writer uses.

`http://user:password@host`, `s3://KEY:SECRET@bucket/...`, `postgresql://mlflow:pw@db:5432/mlflow` and a
bare token (`https://TOKEN@host`) keep their scheme and host, and the user-info part becomes `***`:
`http://***@host`. Config files in run folders, MLflow params and tags, printed lines, error messages and
reports go through `redact` (strings, and every string inside a dict, list or tuple, keys included).
Credentials belong in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), which nothing here records.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
# scheme://USER[:PASSWORD]@ ; the user part stops at '/', the password part may hold '/' (AWS secret keys do)
# and even an unescaped '@': it runs to the last '@' before a space or quote.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/:@\"'<>]+(?::[^\s\"'<>]*)?)@")


def redact(value: Any) -> Any:
    """`value` with the user-info of every URI replaced by `***`; other values are returned unchanged."""
    if isinstance(value, str):
        return _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)
    if isinstance(value, dict):
        return {redact(key): redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


def has_credentials(value: Any) -> bool:
    """Whether `value` (or any string inside it) holds a URI with user-info that `redact` would hide."""
    return redact(value) != value
