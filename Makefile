# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: venv demo test test-slow test-slurm faults lint bench gpu relevance eval resnet18 readout-synthetic

venv: $(VENV)/.installed

# torch and torchvision are pinned here (they lie on this machine's disk); pyproject keeps them open upward.
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

demo: venv
	$(PY) -m readout.tools.demo

lint: venv
	$(VENV)/bin/ruff check readout tests
	$(VENV)/bin/ruff format --check readout tests
	$(VENV)/bin/mypy readout

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

test-slow: venv
	$(VENV)/bin/pytest -q -m slow

# slurm/train_readout.sh under a real single-node SLURM on this machine (tests/test_slurm_real.py; root;
# about 10 minutes). Debian's packages are installed first where they are missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
test-slurm: venv
	command -v slurmctld >/dev/null || $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y slurmctld slurmd slurm-client munge
	$(VENV)/bin/pytest -q -m slurm

# The fault matrix: every fault test (slow ones included), then their table (docs/faults.md).
faults: venv
	$(VENV)/bin/pytest -q -m fault --fault-table=docs/faults.md

# The CPU benchmarks of BENCHMARKS.md (minutes; ratios side by side). GPU rows: add --device cuda.
bench: venv
	$(PY) -m readout.bench --repeats 3 per-sample --classifiers synthetic-cnn --batch-sizes 8
	$(PY) -m readout.bench --repeats 1 readout --classifiers synthetic-cnn --batch 8

# The GPU checks and the --device cuda rows of BENCHMARKS.md ("GPU runs"; about 3 minutes on an H200).
gpu: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider -m gpu
	$(PY) -m readout.bench --device cuda --repeats 3 per-sample --classifiers resnet50 --batch-sizes 8
	$(PY) -m readout.bench --device cuda --repeats 5 per-sample --classifiers synthetic-cnn --batch-sizes 8 64
	$(PY) -m readout.bench --device cuda --repeats 5 readout --classifiers resnet50 --batch 64 --bf16 \
		--channels-last --compile --hidden 1024 512 256
	$(PY) -m readout.bench --device cuda --repeats 3 relevance
	$(PY) -m readout.bench --device cuda --repeats 3 data --workers 0 4 8 16 --bf16 --channels-last

# The product's readout on the synthetic set (docs/readout-training.md): Per-Sample maps of the 12,000
# training images as its teacher (python -m readout.tools.teacher, skipped when the file is there), then the
# demo's recipe with the distillation term (its time: docs/readout-training.md). The shipped
# checkpoints/readout-synthetic records the command in its readout.json.
readout-synthetic: venv
	$(PY) -m readout.tools.demo --teacher data/synthetic/train-teacher.safetensors \
		--bundle checkpoints/readout-synthetic --out runs/readout-synthetic/heatmaps -- \
		--run_dir=runs/readout-synthetic/fit --model.distill_weight=10

# The evaluation table of docs/results.md (methods x metrics on 512 held-out synthetic images).
eval: venv
	$(PY) -m readout.evaluate --config configs/eval/synthetic.yaml

# Relevance-IBA against upsampled IBA (docs/relevance.md): the 224-px readout is trained first,
# distilled from Per-Sample maps of 1,000 training images (times: docs/readout-training.md; its bundle
# is 19 MB, so it is made here rather than shipped).
HIRES := data/synthetic-224
relevance: venv
	test -f $(HIRES)/train/manifest.json || $(PY) -m readout.tools.synthetic --out $(HIRES)/train --n 4000 --size 224 --seed 20
	test -f $(HIRES)/val/manifest.json || $(PY) -m readout.tools.synthetic --out $(HIRES)/val --n 256 --size 224 --seed 21
	test -f $(HIRES)/train-teacher-1k.safetensors || $(PY) -m readout.tools.teacher \
		--classifier checkpoints/synthetic-cnn-224.safetensors --shards '$(HIRES)/train/synthetic-000000.tar' \
		--layer block3 --estimate-samples 500 --out $(HIRES)/train-teacher-1k.safetensors
	test -f checkpoints/readout-224/readout.json || $(PY) -m readout.fit --config configs/synthetic-224.yaml
	$(PY) -m readout.tools.compare_relevance --hires-classifier checkpoints/synthetic-cnn-224.safetensors \
		--readout checkpoints/readout-demo checkpoints/readout-224 --out results/compare-relevance

# A second architecture (docs/resnet18.md): a torchvision resnet18 trained on the synthetic set by the
# classifier-training command; two readouts at layer1 (stride 4) trained as the demo's (β = 3/k, 1/k)
# and scored with Per-Sample on the 512 held-out images; then the distilled readout that meets #15's
# target: a Per-Sample teacher on 5 training shards, the demo's recipe at β = 1/k with the
# distillation term, scored paired to Per-Sample β = 1/k. Hours on 2 cores (docs/resnet18.md gives
# each step's time); each training step is skipped when its output exists.
R18 := runs/resnet18-synthetic
R18_SHARDS := data/synthetic/train/synthetic-{000000..000004}.tar
R18_PS := Per-Sample β=1/k (layer1), chosen on validation
R18_DISTILLED := Readout β=1/k distilled (5k images)
R18_DISTILL_ROWS := [{name: "$(R18_PS)", method: per-sample, options: {beta: 1, layer: layer1}}, \
	{name: "$(R18_DISTILLED)", method: readout, options: {bundle: $(R18)/readout-distill-5k}}]
resnet18: venv
	test -f $(R18)/classifier.json || $(PY) -m readout.tools.train_classifier --architecture resnet18 \
		--out $(R18)/classifier --n-train 16000 --epochs 8 --size 64 --seed 0
	test -f $(R18)/readout/readout.json || $(PY) -m readout.tools.demo --classifier $(R18)/classifier.safetensors \
		--bundle $(R18)/readout --out $(R18)/heatmaps -- --model.layer=layer1 --model.taps=null --run_dir=$(R18)/fit
	test -f $(R18)/readout-beta1/readout.json || $(PY) -m readout.tools.demo --classifier $(R18)/classifier.safetensors \
		--bundle $(R18)/readout-beta1 --out $(R18)/heatmaps-beta1 -- --model.layer=layer1 --model.taps=null \
		--run_dir=$(R18)/fit-beta1 --model.beta=1
	$(PY) -m readout.evaluate --config configs/eval/resnet18-synthetic.yaml
	test -f $(R18)/train-teacher-5k.safetensors || $(PY) -m readout.tools.teacher \
		--classifier $(R18)/classifier.safetensors --shards '$(R18_SHARDS)' --layer layer1 --beta 1 \
		--estimate-samples 2000 --out $(R18)/train-teacher-5k.safetensors
	test -f $(R18)/readout-distill-5k/readout.json || $(PY) -m readout.tools.demo \
		--classifier $(R18)/classifier.safetensors --teacher $(R18)/train-teacher-5k.safetensors \
		--bundle $(R18)/readout-distill-5k --out $(R18)/heatmaps-distill-5k -- --model.layer=layer1 \
		--model.taps=null --run_dir=$(R18)/fit-distill-5k --model.beta=1 --model.distill_weight=10 \
		'--data.train_shards=$(R18_SHARDS)'
	$(PY) -m readout.evaluate --config configs/eval/resnet18-synthetic.yaml --out runs/eval/r18-distill-heldout \
		--reference "$(R18_PS)" --methods '$(R18_DISTILL_ROWS)'
