# flowpress: `make quantize` (the main job) and `make test`. Both create .venv when missing.
# Under make every failing command exits 2 (make's own code); `python -m flowpress ...` keeps
# flowpress's codes: 0 passed, 1 gate failed, 2 bad input or a fault, 3 an engine not faithful here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DIGITS := examples/digits/recipes
RECIPE ?= $(DIGITS)/digits-unet-int8.yaml
TEACHER_RECIPE ?= $(DIGITS)/digits-teacher.yaml
BENCH  ?= recipes/bench.yaml
ABLATION ?= $(DIGITS)/ablation.yaml
STAMP  := $(VENV)/.installed
# every extra but gpu (tensorrt installs only on GPU hosts): pyproject.toml says what needs each
EXTRAS := dev,openvino,lowbit,text,examples,lora

.PHONY: install lock quantize compare engines ablate bench teacher classifier distill precisions test test-fast test-benchmarks quality clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first (a local wheel on these machines), then the rest at the locked versions
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# refresh constraints.txt from what `pip install -e ".[$(EXTRAS)]"` resolves today (torch stays pinned above)
lock: $(STAMP)
	$(PY) -m pip install --quiet --upgrade -e ".[$(EXTRAS)]"
	$(PY) -m pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt

quantize: $(STAMP)
	$(PY) -m flowpress quantize --recipe $(RECIPE) --results results

compare: $(STAMP)
	$(PY) -m flowpress compare --recipe $(RECIPE)

# lint the run's tensorrt graph; on a GPU host with TensorRT build + validate the plan (RECIPE= as above)
engines: $(STAMP)
	$(PY) -m flowpress engines --recipe $(RECIPE)

.PHONY: bench-gpu
bench-gpu: $(STAMP)
	$(PY) -m flowpress bench-gpu --recipe $(RECIPE)

# calibration x temporal cache x activation ranges beside modelopt and onnxruntime -> results/ablation.md
# (ABLATION=examples/digits/recipes/ablation-w4a8.yaml: the W4A8 ingredients, ~45 min -> results/ablation-w4a8.md)
ablate: $(STAMP)
	$(PY) -m benchmarks ablate --recipe $(ABLATION) --results results

# every CPU engine (flowpress's and the hand-built peers') for speed and fidelity -> runs/<name>/, results/<name>.md
# (BENCH=recipes/bench-speed-dit.yaml: the 30M DiT alone, the int8-peak bar in ~20 min)
bench: $(STAMP)
	$(PY) -m benchmarks bench --recipe $(BENCH) --results results

# int8, fp8, W4A8, W4A4 and gated mixed precision of both teachers, then the precision x calibration
# table (results/precisions.md); a run whose gate fails still gets its row
PRECISION_RECIPES ?= digits-unet-int8 digits-unet-fp8 digits-unet-w4a8 digits-unet-w4a4 digits-unet-gated digits-dit-int8 digits-dit-fp8 digits-dit-w4a8 digits-dit-w4a4
precisions: $(STAMP)
	for r in $(PRECISION_RECIPES); do $(PY) -m flowpress quantize --quiet --recipe $(DIGITS)/$$r.yaml || echo "$$r: exit $$?"; done
	$(PY) -m benchmarks precisions --results results

# full-width SD 1.5 / SDXL / PixArt-a / SD3-medium pipelines (random weights, built from their configs, nothing
# downloaded) through `quantize --model` at a small latent size -> runs/scale/, results/scale.md
SCALE_MODELS ?= sd15,sdxl,pixart-alpha,sd3-medium,flux-dev-depth2
.PHONY: scale
scale: $(STAMP)
	$(PY) -m benchmarks.scale --models $(SCALE_MODELS) --results results

# the quick recipe through quantize with 1 process, then 2 (1 thread each): stage times, equal bytes -> results/distributed.md
.PHONY: distributed
distributed: $(STAMP)
	$(PY) -m benchmarks.distributed --results results

teacher: $(STAMP)
	$(PY) -m examples.digits teacher --recipe $(TEACHER_RECIPE)

# SlimFlow: a small one-step student of the teacher (runs/digits-slimflow/, results/distill.md); then
# `make quantize RECIPE=examples/digits/recipes/digits-slimflow-int8.yaml` ships it through the normal chain
DISTILL_RECIPE ?= $(DIGITS)/digits-slimflow.yaml
distill: $(STAMP)
	$(PY) -m flowpress distill --recipe $(DISTILL_RECIPE) --results results

classifier: $(STAMP)
	$(PY) -m examples.digits classifier

# the two diffusers pipelines of the digits demo (committed): an ε-prediction DDPMPipeline and a
# text-to-image latent pipeline (VAE + CLIP + UNet2DConditionModel)
.PHONY: digits-pipelines
digits-pipelines: $(STAMP)
	$(PY) -m examples.digits ddpm
	$(PY) -m examples.digits sd

# the product's tests (CI runs this), the fast subset (no `slow` end-to-end runs), the harness's own
test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-benchmarks: $(STAMP)
	$(PY) -m pytest -q --durations=15 benchmarks/tests

quality: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) tools/check_figures.py

clean:
	rm -rf runs .pytest_cache
