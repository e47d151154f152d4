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

.PHONY: test demo demo-ldm venv clean-demo

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Each test runs on one thread (tests/conftest.py), so one pytest-xdist worker per core; a file's tests stay
# in one worker (--dist loadfile), sharing its module fixtures. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

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
	@echo "  $(DEMO)/scores/member_fraction.json          top-k ranked among the mask's members (rank=members)"
	@echo "  .venv/bin/tensorboard --logdir $(DEMO)        loss, featurize speed, sample grids, influencers"

# The same chain for the text-conditional LDM on the digits with captions ("a handwritten digit seven"):
# masks -> VAE -> LDM on the mask with the featurize callback (latents cached once) -> sample 4 prompts
# with guidance, recording 10 steps in latent space -> score -> report (decoded x0_hat pictures).
LDM_DEMO := runs/demo_ldm
LDM_ARGS := --model.init_args.vae=$(LDM_DEMO)/vae/version_0/checkpoints/vae.ckpt \
	--model.init_args.latent_cache=$(LDM_DEMO)/latents
CAPTIONS := --data.init_args.caption_template="a handwritten digit {label}"
PROMPTS := '["a handwritten digit three", "a handwritten digit five", "a handwritten digit seven", "a handwritten digit zero"]'
demo-ldm: $(STAMP)
	rm -rf $(LDM_DEMO)
	$(PY) cli.py masks --config configs/ddpm_digits.yaml --out_dir $(LDM_DEMO)/masks --num_masks 1 --seed 0 \
		--trainer.logger=false --trainer.default_root_dir=$(LDM_DEMO)/masks
	$(PY) cli.py fit --config configs/vae_digits.yaml --trainer.logger.init_args.save_dir=$(LDM_DEMO) \
		--trainer.logger.init_args.name=vae --trainer.logger.init_args.version=0
	$(PY) cli.py fit --config configs/ldm_digits.yaml --config configs/featurize_digits.yaml $(LDM_ARGS) \
		--data.subset_mask=$(LDM_DEMO)/masks/mask_000.npy --trainer.logger.init_args.save_dir=$(LDM_DEMO) \
		--trainer.logger.init_args.name=fit --trainer.logger.init_args.version=0
	$(PY) cli.py sample --config configs/ldm_digits.yaml $(LDM_ARGS) --checkpoint $(LDM_DEMO)/fit/version_0/checkpoints/step002000.ckpt \
		--out_dir $(LDM_DEMO)/targets --num_targets 4 --num_record_steps 10 --prompts $(PROMPTS) \
		--trainer.logger=false --trainer.default_root_dir=$(LDM_DEMO)/targets
	$(PY) cli.py score --config configs/score_digits.yaml $(CAPTIONS) --model.features=$(LDM_DEMO)/fit/version_0/features \
		--model.targets=$(LDM_DEMO)/targets --trainer.logger.init_args.save_dir=$(LDM_DEMO) \
		--trainer.logger.init_args.name=score --trainer.logger.init_args.version=0
	@echo
	@echo "Done. Look at:"
	@echo "  $(LDM_DEMO)/vae/version_0/samples/reconstructions.png   digits (top) and their VAE reconstructions"
	@echo "  $(LDM_DEMO)/fit/version_0/samples/final.png             LDM samples for the prompts zero ... nine"
	@echo "  $(LDM_DEMO)/scores/target_0000.png ...                  decoded x0_hat per step, top influencers"
	@echo "  $(LDM_DEMO)/scores/index.html                           every target with its prompt"

clean-demo:
	rm -rf $(DEMO) $(LDM_DEMO)
