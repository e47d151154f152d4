# The two commands: `make demo` and `make test`. Both create .venv when it is missing or when
# setup.cfg / pyproject.toml changed since it was made, install the project into it, and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PYTHONHASHSEED := 0

.PHONY: test demo venv clean-demo

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job end to end on the bundled digits: masks -> fit with the featurize callback (one feature
# store per checkpoint) -> sample 4 targets recording 10 steps -> score every (target, step) -> report.
DEMO := runs/demo
CKPT := $(DEMO)/fit/version_0/checkpoints/step002000.ckpt
demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) cli.py masks --config configs/ddpm_digits.yaml --out_dir $(DEMO)/masks --num_masks 1 --seed 0 \
		--trainer.logger=false --trainer.default_root_dir=$(DEMO)/masks
	$(PY) cli.py fit --config configs/ddpm_digits.yaml --config configs/featurize_digits.yaml \
		--data.subset_mask=$(DEMO)/masks/mask_000.npy --trainer.logger.init_args.save_dir=$(DEMO) \
		--trainer.logger.init_args.name=fit --trainer.logger.init_args.version=0
	$(PY) cli.py sample --config configs/ddpm_digits.yaml --checkpoint $(CKPT) --out_dir $(DEMO)/targets \
		--num_targets 4 --num_record_steps 10 --trainer.logger=false --trainer.default_root_dir=$(DEMO)/targets
	$(PY) cli.py score --config configs/score_digits.yaml --model.features=$(DEMO)/fit/version_0/features \
		--model.targets=$(DEMO)/targets --trainer.logger.init_args.save_dir=$(DEMO) \
		--trainer.logger.init_args.name=score --trainer.logger.init_args.version=0
	@echo
	@echo "Done. Look at:"
	@echo "  $(DEMO)/fit/version_0/samples/final.png      samples of the trained model"
	@echo "  $(DEMO)/targets/targets.png                  the 4 generated targets"
	@echo "  $(DEMO)/scores/target_0000.png ...           top influencers per step (green +, red -)"
	@echo "  $(DEMO)/scores/index.html                    every target, one page"
	@echo "  .venv/bin/tensorboard --logdir $(DEMO)        loss, featurize speed, sample grids, influencers"

clean-demo:
	rm -rf $(DEMO)
