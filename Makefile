# The two set-up commands: `make demo` and `make test`. Each creates .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_INSTALL := $(PIP) install --disable-pip-version-check -q -c constraints.txt
PYTEST_ARGS ?=

.PHONY: demo test bench clean-venv

$(PY):
	python3 -m venv $(VENV)

# Stamps re-run the install when the project's requirements change.
$(VENV)/.demo-installed: $(PY) pyproject.toml constraints.txt
	$(PIP_INSTALL) -e ".[bert]"
	touch $@

$(VENV)/.test-installed: $(PY) pyproject.toml constraints.txt
	$(PIP_INSTALL) -e ".[bert,test]"
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -m largebatch demo

test: $(VENV)/.test-installed
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.demo-installed
	$(PY) -m largebatch bench

clean-venv:
	rm -rf $(VENV)
