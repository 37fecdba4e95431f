"""Render charts/alignlab offline and find the lint tools, for tests/test_helm_chart.py.

Rendering uses Helm's own Go SDK through `helm-python-sdk` (libhelm_c over helm v4's engine, no helm binary,
no cluster): values are checked against values.schema.json exactly as `helm install` checks them.
"""

import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "alignlab"
RELEASE = "al"
NAMESPACE = "alignlab"
# The values files the tests render: None = the chart's defaults.
VALUES_FILES = {"defaults": None, "external": "external-values.yaml", "bundled": "bundled-values.yaml",
                "ingress-tls": "ingress-tls-values.yaml"}
# The Kubernetes version whose OpenAPI schemas every rendered object must satisfy (Chart.yaml: >=1.29).
KUBERNETES_VERSION = "1.33.0"


def values_of(case: str) -> dict:
    """The user values of one test case (the file under charts/alignlab/ci/, or {} for the defaults)."""
    name = VALUES_FILES[case]
    return yaml.safe_load((CHART / "ci" / name).read_text()) if name else {}


def render(values: dict, release: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """{template path: manifest text} as `helm template RELEASE charts/alignlab -n NAMESPACE -f ...` prints."""
    import helm_python

    chart = helm_python.Chart.load(str(CHART))
    return chart.render(values, name=release, namespace=namespace, is_install=True)


def render_objects(values: dict) -> list[dict]:
    """Every rendered Kubernetes object, in template order."""
    objects = []
    for _, text in sorted(render(values).items()):
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def find_tool(name: str) -> str | None:
    """A test tool: beside this Python (pip-installed), in the checkov tool venv (`make tools`), or on PATH."""
    for candidate in (Path(sys.executable).parent / name, Path(sys.prefix) / "tools" / name / "bin" / name):
        if candidate.is_file():
            return str(candidate)
    return shutil.which(name)
