# gap: `make test` (what CI runs) and `make demo` (the main job: CPU, <= 10 min from a fresh clone).
PY ?= .venv/bin/python
DEVICE ?= cpu
DEMO ?= out/demo
SYN ?= data/synthetic
N ?= 600
# The tiny synthetic model learns in minutes only with a far larger lr and smaller batch than the paper's 7B recipe.
DEMO_TRAIN ?= --global-batch 16 --micro-batch 16 --lr 5e-3 --head-lr 5e-3 --epochs 8 --warmup-ratio 0.05 --log-every 40
SEEDS ?= 1 2
DEMO_EVAL ?= --batch-size 24 --max-new-tokens 200

.venv/ok: requirements.txt requirements-dev.txt requirements-oracle.txt
	test -d .venv || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	.venv/bin/pip install -q --no-deps -r requirements-oracle.txt
	touch .venv/ok

venv: .venv/ok

test: .venv/ok
	$(PY) -m pytest -q tests

# GAP (PCA head, tau = 0 from the generator's difficulty) against a control trained on the same data with every
# latent span stripped (tau = -1); then the intervention table on the held-out split and the norm profile plot.
demo: .venv/ok
	$(PY) prepare.py synthetic --out $(SYN) --n $(N) --device $(DEVICE)
	for s in $(SEEDS); do \
	  $(PY) train.py --data $(SYN)/prepared --model $(SYN)/model --out $(DEMO)/gap-$$s --tau 0 --seed $$s \
	    --device $(DEVICE) $(DEMO_TRAIN) && \
	  $(PY) train.py --data $(SYN)/prepared --model $(SYN)/model --out $(DEMO)/control-$$s --tau -1 --seed $$s \
	    --device $(DEVICE) $(DEMO_TRAIN) && \
	  $(PY) eval.py --model $(DEMO)/gap-$$s --data $(SYN)/raw/test.jsonl --modes pca,zero,noise,raw \
	    --out $(DEMO)/eval-gap-$$s --device $(DEVICE) $(DEMO_EVAL) && \
	  $(PY) eval.py --model $(DEMO)/control-$$s --data $(SYN)/raw/test.jsonl --modes zero \
	    --out $(DEMO)/eval-control-$$s --device $(DEVICE) $(DEMO_EVAL) || exit 1; \
	done
	$(PY) eval.py norms --model $(DEMO)/gap-$(firstword $(SEEDS)) --data $(SYN)/raw/test.jsonl --out $(DEMO)/norms \
	  --device $(DEVICE)
	$(PY) eval.py summary $(foreach s,$(SEEDS),$(DEMO)/eval-gap-$(s) $(DEMO)/eval-control-$(s))

# The GPU check (one H100, < 10 min): the CUDA-only tests (training; generation: the SDPA kernel of each attention
# form, the CUDA-graph decode step == eager), bench.py's 7B inference rows (decode step against the HBM bound, against
# transformers' eager and static-cache generate), then bench.py's training-step rows for a 7B-width model
# cut to 4 layers at T = 4096 (eager / activation checkpointing, eager / compiled: MFU, peak memory) and the full 7B
# with --fsdp on 8 GPUs extrapolated from 2 and 4 layers.
gpu: .venv/ok
	$(PY) -m pytest -q -s tests/test_gpu.py tests/test_gpu_generate.py
	$(PY) bench.py --config 7b --device cuda --compile --iters 3
	$(PY) bench.py --train --config 7b --layers 4 --device cuda --prompt-len 3838 --compile --iters 3 --gpus 8

.PHONY: venv test demo gpu
