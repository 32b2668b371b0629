# Two commands do all the set-up on a fresh CPU machine:
#   make demo   install, then pretrain -> finetune -> eval -> chat on generated data with a tiny model (CPU, minutes)
#   make test   install, then run the test suite
# On a GPU machine install with `pip install -r requirements.txt` instead (no CPU constraint), see README.md.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= runs/demo

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints-cpu.txt -r requirements-test.txt
	touch $@

test: install
	$(PY) -m pytest

clean:
	rm -rf runs demo_data .pytest_cache
