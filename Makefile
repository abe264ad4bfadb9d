# One-command entry points; each does its own set-up (a virtualenv in .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_ROOT ?= ./data/vtab-1k
DEMO_AREA ?= ./demo_work
PYTEST_ARGS ?=

.PHONY: demo test lint docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "vtab needs Python 3.10 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	@$(PY) -c 'import torchvision' || { echo "torchvision does not import: see SETUP_ENV.md"; exit 1; }
	touch $(STAMP)

# The debug pipeline end to end on the embedded digits dataset, with two CPU runners.
demo: venv
	$(PY) main_prepare_data.py digits --root $(DATA_ROOT)
	rm -rf $(DEMO_AREA) && mkdir -p $(DEMO_AREA)
	cp pipelines/debug/debug.yaml $(DEMO_AREA)/
	VTAB1K_ROOT=$(DATA_ROOT) $(PY) main_runner.py --work_area $(DEMO_AREA) --devices cpu,cpu
	$(PY) main_status.py --work_area $(DEMO_AREA)
	$(PY) main_parse_results.py --root $(DEMO_AREA)/summarized

# pytest exits 5 when it collected no test: that is a failure here, not a success.
test: venv
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest ran no tests: failing"; exit 1; fi; exit $$rc

lint: venv
	$(PY) -m ruff check .

# The key reference in docs/PIPELINES.md, generated from the config schemas.
docs: venv
	$(PY) -m vtab.reference --write docs/PIPELINES.md

clean:
	rm -rf $(VENV) $(DEMO_AREA) .pytest_cache .ruff_cache
