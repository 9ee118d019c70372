# Two entry points: `make run` serves the app, `make test` runs the tests.
# Each creates .venv and installs what it needs the first time (and again when a requirements file changes).
PYTHON ?= python3
VENV := .venv

$(VENV)/app.stamp: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/dev.stamp: $(VENV)/app.stamp requirements-dev.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

.PHONY: run test
run: $(VENV)/app.stamp
	$(VENV)/bin/streamlit run serve.py

# The tests also drive Debian's chromium and start a PostgreSQL server: installed here when missing.
test: $(VENV)/dev.stamp
	scripts/system-packages.sh
	$(VENV)/bin/python -m pytest -q
