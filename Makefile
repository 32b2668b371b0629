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

# The demo: generated pictures, tiny random models with the real Llama-3 tokenizer, both training stages, an
# MMBench-format and a yes/no eval on held-out pictures (one two-benchmark table), and one chat answer. CPU, minutes.
demo: install
	rm -rf $(DEMO) demo_data
	$(PY) demo.py data demo_data
	$(PY) demo.py models demo_data/models
	$(PY) train.py @recipes/demo-pretrain.args
	$(PY) train.py @recipes/demo-finetune.args
	$(PY) eval_mmbench.py --model $(DEMO)/finetune/model --data demo_data/eval.tsv --data demo_data/eval_yesno.tsv \
		--out $(DEMO)/eval --batch-size 16
	$(PY) chat.py --model $(DEMO)/finetune/model --image demo_data/example.png --temperature 0 \
		--max-new-tokens 40 --prompt "What colour are the shapes?" --prompt "How many shapes are there?"

clean:
	rm -rf runs demo_data .pytest_cache
