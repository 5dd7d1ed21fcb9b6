# The two newcomer commands: `make demo` (the pipeline end to end on tiny local models, CPU, no downloads) and
# `make test`. Both create the virtual environment in .venv on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO := demo_output

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt requirements-imagereward.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-imagereward.txt
	touch $@

# Two workers, one test file each at a time (a file's fixtures are built once): the tests' subprocesses run one
# thread each, so two of them keep two cores busy.
test: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -n 2 --dist loadfile --durations=15 tests

demo: setup
	HF_HUB_OFFLINE=1 $(PYTHON) tools/run_demo.py --output_dir $(DEMO)

clean:
	rm -rf $(DEMO)
