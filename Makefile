# Two commands do all set-up: `make test` and `make demo`. Both create/refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
STAMP := $(VENV)/.kit-installed

.PHONY: install test demo clean

install: $(STAMP)

# Re-installs when the package metadata or the local caps change.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/kit demo --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs *.egg-info
