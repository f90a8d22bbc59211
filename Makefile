# gap: `make test` (what CI runs) and `make demo` (the main job: CPU, <= 10 min from a fresh clone).
PY ?= .venv/bin/python
DEVICE ?= cpu
DEMO ?= out/demo
SEEDS ?= 1 2
# The tile miniature (synthetic.py): N examples (TEST_FRAC of them held out: 306 by default), 4 latents per span (the
# selected tile zoomed to 56x56 px = 2x2 merged tokens). BASE is the committed base checkpoint (`make base` remakes it).
SYN ?= data/tiles
N ?= 900
TEST_FRAC ?= 0.34
LATENTS ?= 4
BASE ?= checkpoints/tiles-base
BASE_DATA ?= data/tiles-base
BASE_N ?= 3000
# The tiny models learn in minutes only with a far larger lr and smaller batch than the paper's 7B recipe. lambda:
# the latent loss is a per-element mean, and the miniature's vision embeddings are small (norm 0.6 over d = 128: a
# squared element ~0.003, against ~0.7 at 7B, norm ~50 over d = 3584), so the paper's lambda = 1 would weigh the
# latent loss ~250x less than at 7B; lambda = 100 restores the balance (30 / 300 were weaker here).
BASE_TRAIN ?= --latent-head raw --global-batch 16 --micro-batch 16 --lr 3e-3 --head-lr 3e-3 --epochs 6 \
  --warmup-ratio 0.05 --log-every 50
DEMO_TRAIN ?= --lambda-latent 100 --global-batch 16 --micro-batch 16 --lr 3e-3 --head-lr 3e-3 --epochs 8 \
  --warmup-ratio 0.05 --log-every 50
DEMO_EVAL ?= --batch-size 50 --max-new-tokens 48

# Two stamps: the runtime packages (all `make base` / `make demo` need), then the test-only oracles on top.
.venv/run-ok: requirements.txt
	test -d .venv || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	touch .venv/run-ok

.venv/ok: .venv/run-ok requirements-dev.txt requirements-oracle.txt
	.venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	.venv/bin/pip install -q --no-deps -r requirements-oracle.txt
	touch .venv/ok

venv: .venv/ok

test: .venv/ok
	$(PY) -m pytest -q tests

# The base model: single-hop questions plus flat-image warm-ups, no latents, the random ViT frozen. Its folder keeps
# the config, weights, tokenizer, training log (metrics.jsonl), held-out accuracy (eval/) and the command that made
# it (COMMAND); the optimizer state is dropped.
# One thread per process unless OMP_NUM_THREADS says otherwise: on the 2-core CPU it is faster than torch's default
# of one thread per core (scoring: 57 s against 84 s with 2 threads).
base demo: export OMP_NUM_THREADS ?= 1
base: .venv/run-ok
	$(PY) prepare.py synthetic --task base --out $(BASE_DATA) --n $(BASE_N) --latents $(LATENTS) --device $(DEVICE)
	$(PY) train.py --data $(BASE_DATA)/prepared --model $(BASE_DATA)/model --out $(BASE) --device $(DEVICE) $(BASE_TRAIN)
	rm -rf $(BASE)/checkpoints
	$(PY) eval.py --model $(BASE) --data $(BASE_DATA)/raw/test.jsonl --modes zero --out $(BASE)/eval --device $(DEVICE) \
	  $(DEMO_EVAL)
	echo "OMP_NUM_THREADS=$(OMP_NUM_THREADS) make base BASE_N=$(BASE_N) DEVICE=$(DEVICE) BASE_TRAIN='$(BASE_TRAIN)'" \
	  > $(BASE)/COMMAND

# From the base: two-hop data scored by the base (8 samples; tau = 0 keeps latents where it never succeeds), built
# with its ViT; then per seed GAP (PCA head, tau 0) and the control trained on the same data with every latent span
# stripped (tau -1), each evaluated on the held-out split (GAP: the intervention table; both: the oracle-latent
# probe), two jobs at a time with one thread each (on 2 cores, 1.6x the throughput of one 2-thread job); then the norm
# profile and the summary over seeds (printed and written to $(DEMO)/summary.json).
SEED_RUNS = $(foreach s,$(SEEDS),$(DEMO)/eval-gap-$(s)/results.json $(DEMO)/eval-control-$(s)/results.json \
  $(DEMO)/oracle-$(s)/results.json)
demo: .venv/run-ok
	$(PY) prepare.py synthetic --task tiles --out $(SYN) --n $(N) --test-frac $(TEST_FRAC) --latents $(LATENTS)
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j2 -Otarget $(SYN)/raw/train.scored.jsonl \
	  $(SYN)/prepared-test/manifest.json $(DEMO)/eval-base/results.json
	$(PY) prepare.py build --data $(SYN)/raw/train.scored.jsonl --model $(BASE) --out $(SYN)/prepared \
	  --latents $(LATENTS) --device $(DEVICE)
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j2 -Otarget $(SEED_RUNS) $(DEMO)/norms/norms.json
	$(PY) eval.py summary $(foreach s,$(SEEDS),$(DEMO)/eval-gap-$(s) $(DEMO)/eval-control-$(s) $(DEMO)/oracle-$(s)) \
	  --json $(DEMO)/summary.json

# The jobs, as files; each reruns when what it reads is newer (every `make demo` rewrites raw/ and prepared/). The
# scores are made afresh (`prepare.py score` would resume from an old file, scored by another base perhaps).
$(SYN)/raw/train.scored.jsonl: $(SYN)/raw/train.jsonl
	rm -f $@
	$(PY) prepare.py score --data $< --model $(BASE) --samples 8 --max-new-tokens 20 --out $@ --device $(DEVICE)
$(SYN)/prepared-test/manifest.json: $(SYN)/raw/test.jsonl
	$(PY) prepare.py build --data $< --model $(BASE) --out $(SYN)/prepared-test --latents $(LATENTS) --device $(DEVICE)
$(DEMO)/eval-base/results.json: $(SYN)/raw/test.jsonl
	$(PY) eval.py --model $(BASE) --data $< --modes zero --out $(DEMO)/eval-base --device $(DEVICE) $(DEMO_EVAL)
$(DEMO)/norms/norms.json: $(DEMO)/gap-$(firstword $(SEEDS))/model.safetensors
	$(PY) eval.py norms --model $(DEMO)/gap-$(firstword $(SEEDS)) --data $(SYN)/raw/test.jsonl --out $(DEMO)/norms \
	  --device $(DEVICE)
.PRECIOUS: $(DEMO)/gap-%/model.safetensors $(DEMO)/control-%/model.safetensors $(DEMO)/full-%/model.safetensors \
  $(DEMO)/raw-%/model.safetensors
$(DEMO)/gap-%/model.safetensors: $(SYN)/prepared/manifest.json
	$(PY) train.py --data $(SYN)/prepared --model $(BASE) --out $(DEMO)/gap-$* --tau 0 --seed $* --device $(DEVICE) \
	  $(DEMO_TRAIN)
$(DEMO)/control-%/model.safetensors: $(SYN)/prepared/manifest.json
	$(PY) train.py --data $(SYN)/prepared --model $(BASE) --out $(DEMO)/control-$* --tau -1 --seed $* \
	  --device $(DEVICE) $(DEMO_TRAIN)
$(DEMO)/eval-gap-%/results.json: $(DEMO)/gap-%/model.safetensors
	$(PY) eval.py --model $(DEMO)/gap-$* --data $(SYN)/raw/test.jsonl --modes pca,zero,noise,raw \
	  --out $(DEMO)/eval-gap-$* --device $(DEVICE) $(DEMO_EVAL)
$(DEMO)/eval-control-%/results.json: $(DEMO)/control-%/model.safetensors
	$(PY) eval.py --model $(DEMO)/control-$* --data $(SYN)/raw/test.jsonl --modes zero \
	  --out $(DEMO)/eval-control-$* --device $(DEVICE) $(DEMO_EVAL)
$(DEMO)/oracle-%/results.json: $(DEMO)/gap-%/model.safetensors $(SYN)/prepared-test/manifest.json
	$(PY) eval.py oracle --model $(DEMO)/gap-$* --data $(SYN)/prepared-test --out $(DEMO)/oracle-$* --device $(DEVICE)

# The paper's other heads on the demo's data (after `make demo`; ~7 more minutes on 2 cores for 3 seeds): the full
# d -> d head (LH) and a model trained with raw output-as-input feedback, each evaluated with its own latents and with
# zero latents; summary printed and written to $(DEMO)/variants.json.
HEAD_RUNS = $(foreach h,full raw,$(foreach s,$(SEEDS),$(DEMO)/eval-$(h)-$(s)/results.json))
variants: .venv/run-ok
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j2 -Otarget $(HEAD_RUNS)
	$(PY) eval.py summary $(HEAD_RUNS:/results.json=) --json $(DEMO)/variants.json

$(DEMO)/full-%/model.safetensors: $(SYN)/prepared/manifest.json
	$(PY) train.py --data $(SYN)/prepared --model $(BASE) --out $(DEMO)/full-$* --latent-head full --tau 0 --seed $* \
	  --device $(DEVICE) $(DEMO_TRAIN)
$(DEMO)/raw-%/model.safetensors: $(SYN)/prepared/manifest.json
	$(PY) train.py --data $(SYN)/prepared --model $(BASE) --out $(DEMO)/raw-$* --latent-head raw --tau 0 --seed $* \
	  --device $(DEVICE) $(DEMO_TRAIN)
$(DEMO)/eval-full-%/results.json: $(DEMO)/full-%/model.safetensors
	$(PY) eval.py --model $(DEMO)/full-$* --data $(SYN)/raw/test.jsonl --modes full,zero --out $(DEMO)/eval-full-$* \
	  --device $(DEVICE) $(DEMO_EVAL)
$(DEMO)/eval-raw-%/results.json: $(DEMO)/raw-%/model.safetensors
	$(PY) eval.py --model $(DEMO)/raw-$* --data $(SYN)/raw/test.jsonl --modes raw,zero --out $(DEMO)/eval-raw-$* \
	  --device $(DEVICE) $(DEMO_EVAL)
$(SYN)/prepared/manifest.json:
	@echo "error: $@: no demo data yet; run make demo first" >&2; exit 1

# The GPU check (one H100, < 10 min): the CUDA-only tests (training; generation: the SDPA kernel of each attention
# form, the CUDA-graph decode step == eager), bench.py's 7B inference rows (decode step against the HBM bound, against
# transformers' eager and static-cache generate), then bench.py's training-step rows for a 7B-width model
# cut to 4 layers at T = 4096 (eager / activation checkpointing, eager / compiled: MFU, peak memory) and the full 7B
# with --fsdp on 8 GPUs extrapolated from 2 and 4 layers.
# It uses the GPU machine's own python (torch with CUDA), not .venv's CPU wheel: `make gpu GPU_PY=...` to change it.
GPU_PY ?= python3
gpu:
	$(GPU_PY) -m pytest -q -s tests/test_gpu.py tests/test_gpu_generate.py
	$(GPU_PY) bench.py --config 7b --device cuda --compile --iters 3
	$(GPU_PY) bench.py --train --config 7b --layers 4 --device cuda --prompt-len 3838 --compile --iters 3 --gpus 8

.PHONY: venv test base demo variants gpu
