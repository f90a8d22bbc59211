# gap: make test (what CI runs), make demo (the main job, CPU, <= 10 min)
PY ?= .venv/bin/python
DEVICE ?= cpu

.venv/ok: requirements.txt requirements-dev.txt
	test -d .venv || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	touch .venv/ok

venv: .venv/ok

test: .venv/ok
	$(PY) -m pytest -q tests

demo: .venv/ok
	bash demo.sh $(DEVICE)

.PHONY: venv test demo
