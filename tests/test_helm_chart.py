"""charts/alignlab: rendered offline by Helm's engine for each values file under charts/alignlab/ci/, every
object checked against the Kubernetes OpenAPI schemas of a pinned version and the CRD schemas it uses, the
production defaults asserted, checkov on the manifests and hadolint on the Dockerfile with only the skips
explained in infra/lint-skips.yaml, snapshots, and the compiled KFP pipelines' platform spec against the chart.
"""

import json
import os
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_chart import (CHART, KUBERNETES_VERSION, NAMESPACE, RELEASE, REPO, VALUES_FILES, find_tool, render,
                        render_objects, values_of)

CRD_SCHEMAS = Path(__file__).parent / "data" / "crd-schemas"
CRD_FILES = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
             ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
             ("batch.volcano.sh/v1alpha1", "Job"): "job-batch.volcano.sh-v1alpha1.json"}
SNAPSHOTS = Path(__file__).parent / "snapshots" / "helm"
SKIPS = yaml.safe_load((REPO / "infra" / "lint-skips.yaml").read_text())
WORKLOADS = ("Deployment", "StatefulSet")
CASES = list(VALUES_FILES)


def validate_object(obj: dict) -> None:
    """Kubernetes OpenAPI (strict: unknown fields fail) for built-in kinds, the shipped CRD schema otherwise."""
    crd = CRD_FILES.get((obj["apiVersion"], obj["kind"]))
    if crd is None:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        return
    schema = json.loads((CRD_SCHEMAS / crd).read_text())
    jsonschema.Draft7Validator(schema).validate(obj)


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]) for o in objects
            if o["kind"] in WORKLOADS]


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_matches_its_api_schema(case):
    objects = render_objects(values_of(case))
    kinds = {o["kind"] for o in objects}
    assert {"ConfigMap", "Deployment", "Service", "Role", "RoleBinding", "NetworkPolicy", "ServiceMonitor",
            "PrometheusRule"} <= kinds, kinds
    for obj in objects:
        try:
            validate_object(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as err:
            pytest.fail(f"{case}: {obj['kind']}/{obj['metadata']['name']}: {err}")
        assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]


def test_values_files_switch_components():
    names = {case: {(o["kind"], o["metadata"]["name"]) for o in render_objects(values_of(case))} for case in CASES}
    assert ("StatefulSet", "al-alignlab-postgresql") in names["defaults"]
    assert ("StatefulSet", "al-alignlab-postgresql") not in names["external"]
    assert ("StatefulSet", "al-alignlab-seaweedfs") in names["bundled"]
    assert not any(kind == "StatefulSet" and "seaweedfs" in name for kind, name in names["defaults"])
    assert ("PersistentVolumeClaim", "alignlab-workspace") in names["defaults"]
    assert not any(kind == "PersistentVolumeClaim" for kind, _ in names["external"])  # an existing claim
    assert ("Ingress", "al-alignlab-dashboard") in names["ingress-tls"]
    ingress = next(o for o in render_objects(values_of("ingress-tls")) if o["kind"] == "Ingress")
    assert ingress["spec"]["tls"] == [{"hosts": ["alignlab.example.org"], "secretName": "alignlab-dashboard-tls"}]


@pytest.mark.parametrize("case", CASES)
def test_production_defaults(case):
    """Non-root, read-only root filesystem, no capabilities, requests + limits, probes, NetworkPolicies, and
    no Secret objects (credentials are referenced by existingSecret only)."""
    objects = render_objects(values_of(case))
    assert not [o for o in objects if o["kind"] == "Secret"]
    for where, spec in pod_specs(objects):
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["automountServiceAccountToken"] is False, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert set(c["resources"]) == {"requests", "limits"}, where
            assert not c["image"].endswith(":latest"), where
        for c in spec["containers"]:
            assert "livenessProbe" in c and "readinessProbe" in c, where
    protected = {tuple(sorted(p["spec"]["podSelector"]["matchLabels"].items())) for p in objects
                 if p["kind"] == "NetworkPolicy"}
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            assert tuple(sorted(obj["spec"]["selector"]["matchLabels"].items())) in protected, obj["metadata"]


def test_mlflow_server_flags():
    defaults = render_objects({})
    mlflow = next(o for o in defaults if o["kind"] == "Deployment" and o["metadata"]["name"] == "al-alignlab-mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--workers=2" in args and "--serve-artifacts" in args
    assert "--artifacts-destination=s3://mlflow/artifacts" in args
    assert any(a.startswith("--expose-prometheus=") for a in args)
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "al-alignlab-mlflow.alignlab.svc.cluster.local" in hosts
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == \
        "postgresql://mlflow:$(POSTGRES_PASSWORD)@al-alignlab-postgresql:5432/mlflow"
    external = next(o for o in render_objects(values_of("external"))
                    if o["kind"] == "Deployment" and o["metadata"]["name"] == "al-alignlab-mlflow")
    env = {e["name"]: e for e in external["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres",
                                                                           "key": "connection-uri"}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://storage.googleapis.com"


@pytest.mark.parametrize("values, field", [
    ({"image": {"tag": "latest"}}, "/image/tag"),
    ({"mlflow": {"workerz": 4}}, "workerz"),
    ({"s3": {"endpoint": "s3.example.org"}}, "/s3/endpoint"),
    ({"platform": {"pipeline": {"memory": "lots"}}}, "/platform/pipeline/memory"),
    ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    ({"dashboard": {"resources": {"requests": {"cpu": "lots"}}}}, "/dashboard/resources/requests/cpu"),
    ({"mlflow": {"workers": 0}}, "/mlflow/workers"),
])
def test_values_schema_rejects_bad_values(values, field):
    import helm_python

    with pytest.raises(helm_python.HelmValuesError) as err:
        render(values)
    assert field in str(err.value)


@pytest.mark.parametrize("case", CASES)
def test_rendered_manifests_match_snapshot(case):
    """The rendered chart, file by file; ALIGNLAB_UPDATE_SNAPSHOTS=1 rewrites the snapshot after a change."""
    text = "".join(f"# Source: {path}\n{body.strip()}\n---\n" for path, body in sorted(render(values_of(case)).items())
                   if body.strip())
    snapshot = SNAPSHOTS / f"{case}.yaml"
    if os.environ.get("ALIGNLAB_UPDATE_SNAPSHOTS") == "1":
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(text)
    assert snapshot.is_file(), f"{snapshot} missing: run with ALIGNLAB_UPDATE_SNAPSHOTS=1 once"
    assert text == snapshot.read_text(), f"{case}: rendered chart differs from {snapshot} (intended? update it)"


def test_lint_skips_are_explained():
    for tool in ("checkov", "hadolint"):
        assert isinstance(SKIPS[tool], dict), tool
        for check, reason in SKIPS[tool].items():
            assert isinstance(reason, str) and len(reason.split()) >= 5, f"{tool} {check}: give a reason"


def test_checkov_finds_nothing_unexplained_in_rendered_manifests(tmp_path):
    checkov = find_tool("checkov")
    assert checkov, "checkov is not installed: run `make tools` (its own venv under .venv/tools/checkov)"
    for case in CASES:
        (tmp_path / f"{case}.yaml").write_text(
            "\n---\n".join(yaml.safe_dump(o, sort_keys=False) for o in render_objects(values_of(case))))
    result = subprocess.run([checkov, "-d", str(tmp_path), "--framework", "kubernetes", "-o", "json", "--compact",
                             "--quiet", "--skip-check", ",".join(SKIPS["checkov"])],
                            capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    report = report if isinstance(report, dict) else report[0]
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
              for c in report["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    assert report["summary"]["passed"] > 100, report["summary"]


def test_hadolint_finds_nothing_unexplained_in_dockerfile():
    hadolint = find_tool("hadolint")
    assert hadolint, "hadolint is not installed: pip install -c constraints.txt -e '.[dev]'"
    ignores = [arg for rule in SKIPS["hadolint"] for arg in ("--ignore", rule)]
    result = subprocess.run([hadolint, "--format", "json", *ignores, str(REPO / "infra/images/alignlab/Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert not findings, "\n".join(f"{f['code']} line {f['line']}: {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", ["defaults", "external"])
def test_compiled_pipeline_references_what_the_chart_creates(case, tmp_path):
    """`alignlab compile --settings` with the chart's pipeline-settings.yaml: the KFP platform spec mounts the
    chart's workspace claim, reads the chart's S3 Secret, uses its node pool; the steps track into the chart's
    MLflow Service and run the chart's image."""
    from alignlab_pipelines.compile import compile_spec
    from alignlab_pipelines.settings import load_settings

    values = values_of(case)
    objects = render_objects(values)
    settings_map = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    (tmp_path / "settings.yaml").write_text(settings_map["pipeline-settings.yaml"])
    package = compile_spec(REPO / "ablations" / "demo.yaml", tmp_path / "demo.yaml",
                           load_settings(tmp_path / "settings.yaml"))
    pipeline, platform = yaml.safe_load_all(package.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    claims |= {values.get("platform", {}).get("workspace", {}).get("claimName")} - {None} \
        if not values.get("platform", {}).get("workspace", {}).get("create", True) else set()
    secrets_used_by_chart = {e["valueFrom"]["secretKeyRef"]["name"] for _, spec in pod_specs(objects)
                             for c in spec["containers"] for e in c.get("env", []) if "valueFrom" in e}
    mounted = {m["constant"] for ex in executors.values() for m in ex.get("pvcMount", [])}
    secrets = {s["secretName"] for ex in executors.values() for s in ex.get("secretAsEnv", [])}
    assert mounted and mounted <= claims, (mounted, claims)
    assert secrets and secrets <= secrets_used_by_chart, (secrets, secrets_used_by_chart)
    pipeline_values = values.get("platform", {}).get("pipeline", {})
    gpu_executors = [ex for ex in executors.values() if "nodeSelector" in ex or "tolerations" in ex]
    if pipeline_values.get("nodeSelector"):
        assert gpu_executors and all(ex["nodeSelector"]["labels"] == pipeline_values["nodeSelector"]
                                     for ex in gpu_executors)
        assert all(ex["tolerations"] == pipeline_values["tolerations"] for ex in gpu_executors)

    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    containers = [ex["container"] for ex in pipeline["deploymentSpec"]["executors"].values()]
    for container in containers:
        env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
        host = env["MLFLOW_TRACKING_URI"].split("//")[1].split(".")[0]
        assert host in services and env["MLFLOW_TRACKING_URI"].endswith(f".{NAMESPACE}.svc.cluster.local:5000")
        assert container["image"] == settings_map["ALIGNLAB_IMAGE"]
    if values.get("image", {}).get("digest"):
        assert settings_map["ALIGNLAB_IMAGE"].endswith("@" + values["image"]["digest"])


def test_torchx_volcano_job_is_valid_and_allowed_by_the_chart_rbac(tmp_path):
    """The Volcano Job a distributed train step submits (TorchX dry run with the chart's image, queue and
    workspace claim) matches Volcano's CRD schema and its pod template the Kubernetes one; the chart's Role
    lets the step's service account create and watch it."""
    from alignlab_components.torchx_launch import launch_train

    values = values_of("external")
    objects = render_objects(values)
    settings = yaml.safe_load(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["pipeline-settings.yaml"])
    result = launch_train(REPO / "configs" / "tiny_synthcaps.yaml", [], "/workspace/runs/demo/clip-seed-0",
                          nproc_per_node=settings["nproc_per_node"], nnodes=settings["nnodes"],
                          scheduler="kubernetes", dryrun=True, spec_dir=tmp_path,
                          scheduler_cfg={"queue": settings["torchx_queue"], "namespace": NAMESPACE},
                          image=settings["image"], gpu=settings["gpus"],
                          mounts=[f"type=volume,src={settings['pvc']},dst=/workspace"])
    job = yaml.safe_load((result.spec_dir / "volcano-job.yaml").read_text())
    job.setdefault("metadata", {}).setdefault("namespace", NAMESPACE)
    validate_object(job)
    for task in job["spec"]["tasks"]:
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": task["template"]}
        kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)
        claims = {v["persistentVolumeClaim"]["claimName"] for v in task["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {values["platform"]["workspace"]["claimName"]}
    role = next(o for o in objects if o["kind"] == "Role")
    allowed = {verb for rule in role["rules"] if "batch.volcano.sh" in rule["apiGroups"] and "jobs" in rule["resources"]
               for verb in rule["verbs"]}
    assert {"create", "get", "watch", "delete"} <= allowed
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert [s["name"] for s in binding["subjects"]] == values["torchx"]["serviceAccounts"]
