# flowpress: `make quantize` (the main job) and `make test`. Both create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
RECIPE ?= recipes/digits-unet-int8.yaml
TEACHER_RECIPE ?= recipes/digits-teacher.yaml
STAMP  := $(VENV)/.installed

.PHONY: install quantize compare engines ablate bench teacher classifier distill precisions test quality clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first (a local wheel on these machines), then the rest
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quantize: $(STAMP)
	$(PY) -m flowpress quantize --recipe $(RECIPE)

compare: $(STAMP)
	$(PY) -m flowpress compare --recipe $(RECIPE)

# lint the run's tensorrt graph; on a GPU host with TensorRT build + validate the plan (RECIPE= as above)
engines: $(STAMP)
	$(PY) -m flowpress engines --recipe $(RECIPE)

.PHONY: bench-gpu
bench-gpu: $(STAMP)
	$(PY) -m flowpress bench-gpu --recipe $(RECIPE)

ablate: $(STAMP)
	$(PY) -m flowpress ablate --recipe recipes/ablation.yaml

# every CPU engine (flowpress's and the hand-built peers') for speed and fidelity -> runs/bench/
bench: $(STAMP)
	$(PY) -m flowpress bench --recipe recipes/bench.yaml

# int8, fp8, W4A8 and gated mixed precision of both teachers, then the precision x calibration
# table (runs/precisions/precisions.md); a run whose gate fails still gets its row
PRECISION_RECIPES ?= digits-unet-int8 digits-unet-fp8 digits-unet-w4a8 digits-unet-gated digits-dit-int8 digits-dit-fp8 digits-dit-w4a8
precisions: $(STAMP)
	for r in $(PRECISION_RECIPES); do $(PY) -m flowpress quantize --quiet --recipe recipes/$$r.yaml || echo "$$r: exit $$?"; done
	$(PY) -m flowpress precisions

teacher: $(STAMP)
	$(PY) -m flowpress teacher --recipe $(TEACHER_RECIPE)

# SlimFlow: a small one-step student of the teacher (runs/digits-slimflow/distill.json); then
# `make quantize RECIPE=recipes/digits-slimflow-int8.yaml` ships it through the normal chain
DISTILL_RECIPE ?= recipes/digits-slimflow.yaml
distill: $(STAMP)
	$(PY) -m flowpress distill --recipe $(DISTILL_RECIPE)

classifier: $(STAMP)
	$(PY) -m flowpress classifier

test: $(STAMP)
	$(PY) -m pytest -q

quality: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf runs .pytest_cache
