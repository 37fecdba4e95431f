#!/usr/bin/env bash
# `make image-test`: run the built image ($IMAGE) here with podman (no daemon): `alignlab --help`, a tiny
# training run + evaluation tracked into MLflow (the run must carry the image digest), then the demo ablation
# as its KFP pipeline with every task in the image (kfp's DockerRunner against `podman system service`).
# Prints the time of each part. Storage: vfs (no overlayfs here), so each container start copies the image.
set -euo pipefail
cd "$(dirname "$0")/../.."
image=${IMAGE:?IMAGE (e.g. alignlab:0.1.0-cu130)}
case $image in */*) ;; *) image=localhost/$image ;; esac
export CONTAINERS_CONF=$PWD/infra/images/containers.conf
podman=(podman --storage-driver "${STORAGE_DRIVER:-vfs}")
python=${PYTHON:-.venv/bin/python}
digest=$("${podman[@]}" image inspect --format '{{.Digest}}' "$image")
work=$(mktemp -d /tmp/alignlab-image-test.XXXXXX)
chmod 0777 "$work"  # the image runs as uid 10001
sock=$work/podman.sock
cleanup() { [ -n "${service:-}" ] && kill "$service" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
run() { "${podman[@]}" run --rm --network none -v "$work:/workspace" -e OMP_NUM_THREADS=1 -e HOME=/tmp \
            -e "ALIGNLAB_IMAGE=$image" -e "ALIGNLAB_IMAGE_DIGEST=$digest" "$image" "$@"; }
step() { echo; echo "== $1"; t0=$(date +%s); }
took() { echo "-- ok in $(( $(date +%s) - t0 )) s"; }
echo "image $image  digest $digest"
parts=${IMAGE_TEST_PARTS:-help train demo}  # e.g. IMAGE_TEST_PARTS=demo to rerun only the pipeline

if [[ " $parts " == *" help "* ]]; then
step "alignlab --help in the image"
run alignlab --help | head -3
took
fi

if [[ " $parts " == *" train "* ]]; then
step "tiny training + evaluation in the image, tracked into MLflow (sqlite in the mounted folder)"
run sh -c 'set -e
alignlab data synth --out data/tiny num_train=512 shard_size=256 num_retrieval_test=64 num_retrieval_val=32
alignlab train /opt/alignlab/share/configs/tiny_synthcaps.yaml data.root=data/tiny train.epochs=1 \
    train.batch_size=64 data.num_workers=0 train.progress=false eval.enabled=false name=image-test \
    eval.linear_probe_task=null "eval.shifts=[]" eval.histogram=false \
    --run-dir runs/image-test
alignlab evaluate runs/image-test/final.pt --out runs/image-test/eval
python - <<PY
from mlflow.tracking import MlflowClient
import os
runs = MlflowClient(tracking_uri="sqlite:///mlflow.db").search_runs(
    [e.experiment_id for e in MlflowClient(tracking_uri="sqlite:///mlflow.db").search_experiments()])
tags = [r.data.tags.get("alignlab.image") for r in runs]
assert runs and all(t == os.environ["ALIGNLAB_IMAGE_DIGEST"] for t in tags), tags
print(f"{len(runs)} MLflow run(s) tagged alignlab.image={tags[0]}")
PY'
took
fi

if [[ " $parts " == *" demo "* ]]; then
step "demo pipeline: every task in the image through kfp's DockerRunner on podman's Docker API"
"${podman[@]}" system service --time=0 "unix://$sock" & service=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.2; done
mkdir -p "$work/demo" && chmod 0777 "$work/demo"
DOCKER_HOST=unix://$sock PYTHONPATH=platform:components:pipelines "$python" infra/images/run_demo_in_image.py \
    "$image" "$digest" "$work/demo" 'seeds=[0]' train.epochs=1 data.synth.num_train=512 data.synth.shard_size=256
took
fi
echo; echo "image-test passed: $image ($digest)"
