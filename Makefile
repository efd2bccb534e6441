# Two commands for a newcomer (README): `make demo` runs the workflow on the embedded default,
# `make test` runs the test suite. Both create .venv on first use and reinstall only when pyproject.toml,
# this Makefile or the torch choice changed.
#
#   make demo                       the Snakemake workflow on configs/default.yaml
#   make test                       the pytest suite
#   make study                      the seeded study (configs/study.yaml; hours on 2 cores, README "The study")
#   make bench                      the benchmarks against their limits (JSON in results/benchmarks/, table printed)
#   make pull                       after a clone: dvc pull + dvc status + snakemake --touch (nothing to redo)
#   make img2dataset                img2dataset in its own environment (.venv-img2dataset), for CC3M/SBU images
#   make slurm-profile              one-time: lets `snakemake --profile slurm` find workflow/profiles/slurm
#   make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126' test   (CUDA build)

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
# Snakemake jobs at once (--cores): every GPU-class job is one torch thread (launch.cpus_per_task: 1). Two at a
# time on the demo machine's 2 cores (three at once measured slower: 64% of the jobs done in 9 minutes, against 10
# minutes for all of them two at a time).
CORES ?= 2
# The stamp's name carries the torch choice, so a new TORCH_SPEC reinstalls.
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH_SPEC)' | sha1sum | cut -c1-10)
BIN := $(abspath $(VENV))/bin
RUN := PATH="$(BIN):$$PATH"

.PHONY: demo study test bench lint venv clean-venv slurm-profile pull img2dataset

venv: $(STAMP)

# img2dataset fetches web-scale image lists (CC3M, SBU). Its dependencies (opencv, wandb, albumentations, an
# older pandas) clash with the core environment, so it gets its own; the workflow runs it as a command
# (download.img2dataset=.venv-img2dataset/bin/img2dataset). The tests use it against a loopback server.
I2D_VENV ?= .venv-img2dataset
I2D_SPEC ?= img2dataset==1.47.0
I2D_STAMP := $(I2D_VENV)/.installed-$(shell printf '%s' '$(I2D_SPEC)' | sha1sum | cut -c1-10)

img2dataset: $(I2D_STAMP)

$(I2D_STAMP):
	test -x $(I2D_VENV)/bin/python || $(PYTHON) -m venv $(I2D_VENV)
	$(I2D_VENV)/bin/python -m pip install --quiet $(I2D_SPEC)
	rm -f $(I2D_VENV)/.installed-*
	touch $@

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,detector,workflow]'
	# Every interpreter of the venv prepares torchvision's operators before anything imports it (transformers
	# does): PyPI's CUDA-built torchvision cannot load them beside a CPU torch (mvptr.regions.torchvision_compat).
	printf 'import mvptr.regions.torchvision_compat as c; c.install_import_hook()\n' > \
		"$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mvptr_torchvision.pth"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(RUN) snakemake --cores $(CORES) --workflow-profile workflow/profiles/default all
	@cat results/summary/*/headline.md

# Each benchmark against its limit, one after another (each times its sides in one run; both cores each), then the
# table of ratios and targets (benchmarks/summary.py). About 3 minutes on 2 cores.
bench: $(STAMP)
	for method in mvptr simla semvlp; do $(RUN) python benchmarks/bench_step.py --method $$method --steps 5 > /dev/null; done
	$(RUN) python benchmarks/bench_concepts.py > /dev/null
	$(RUN) python benchmarks/bench_loader.py > /dev/null
	$(RUN) python benchmarks/bench_region_store.py > /dev/null
	$(RUN) python benchmarks/bench_dryrun.py > /dev/null
	$(RUN) python benchmarks/summary.py

# The seeded study: its own world (configs/study.yaml), so the demo's results stay; prints the seed statistics.
study: $(STAMP)
	$(RUN) snakemake --cores $(CORES) --workflow-profile workflow/profiles/default study --configfile configs/study.yaml
	@cat results/study/statistics.md

# Test files run in parallel (pytest-xdist; one file per worker keeps each file's fixtures in one process):
# most of the suite's time is subprocesses, Snakemake and the SLURM cluster waiting, not both cores busy.
TEST_WORKERS ?= auto --maxprocesses=4
test: $(STAMP) $(I2D_STAMP)
	$(RUN) python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: $(STAMP)
	$(RUN) snakemake --lint
	$(RUN) snakefmt --check Snakefile workflow/rules

clean-venv:
	rm -rf $(VENV)

# Snakemake looks a bare profile name up in ~/.config/snakemake (not in workflow/profiles/): link ours there.
slurm-profile:
	mkdir -p $(HOME)/.config/snakemake
	ln -sfn $(abspath workflow/profiles/slurm) $(HOME)/.config/snakemake/slurm

# After cloning: fetch the artifacts from the DVC remote, show their status, then mark them up to date for
# Snakemake, whose `-n` would otherwise want to redo rules (`dvc pull` sets file times in no particular order).
# SNAKEMAKE_CONFIG: the --config values the workflow ran with, if any. Needs .venv (make test or make demo).
SNAKEMAKE_CONFIG ?=
pull:
	$(RUN) dvc pull
	$(RUN) dvc status
	$(RUN) snakemake --touch --cores 1 all $(if $(SNAKEMAKE_CONFIG),--config) $(SNAKEMAKE_CONFIG)
