# hnm-mil: every target installs into .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo/extract.yaml
MIL_CONFIG ?= configs/demo/mil_abmil.yaml
HNM_CONFIG ?= configs/demo/hnm.yaml
ROUNDS ?= 1
OUT ?= demo_out
TEST_WORKERS ?= 2
MUTANTS ?= mil.losses.* mil.evaluation.* mil.mining.* mil.training.module.*
MUTATE_WORKERS ?= 2

.PHONY: install demo extract train hnm test bench clean mutate

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m mil.viewer.assets
	@touch $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py --out $(OUT)

extract: install
	$(BIN)/features extract --config $(CONFIG) $(ARGS)

train: install
	$(BIN)/mil fit --config $(MIL_CONFIG) $(ARGS)

hnm: install
	$(BIN)/mil hnm --config $(HNM_CONFIG) --rounds $(ROUNDS) $(ARGS)

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(ARGS)

# Mutation testing ([tool.mutmut] in pyproject.toml, docs/testing.md); not part of `make test`.
mutate: install
	$(BIN)/python -m pip install --quiet -e '.[mutate]'
	env -u PYTHONPATH WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/mutmut run --max-children $(MUTATE_WORKERS) $(foreach m,$(MUTANTS),'$(m)')
	$(BIN)/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json

bench: install
	$(BIN)/python benchmarks/run_all.py --out bench_out $(ARGS)

clean:
	rm -rf $(OUT) bench_out runs wandb lightning_logs .pytest_cache mutants
