# The two newcomer commands: `make demo` (the pipeline end to end on tiny local models, CPU, no downloads) and
# `make test`. Both create the virtual environment in .venv on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO := demo_output

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt requirements-imagereward.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-imagereward.txt
	touch $@

test: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests

demo: setup
	HF_HUB_OFFLINE=1 $(PYTHON) tools/make_tiny_models.py $(DEMO)/models
	HF_HUB_OFFLINE=1 $(PYTHON) generate_candidates.py --pretrained_model_name_or_path $(DEMO)/models/sd15 \
		--prompts_file examples/demo_prompts.txt --num_variants 3 --num_images_per_prompt 2 \
		--num_inference_steps 10 --output_dir $(DEMO)/candidates_sd15
	HF_HUB_OFFLINE=1 $(PYTHON) generate_candidates.py --pretrained_model_name_or_path $(DEMO)/models/sdxl \
		--prompts_file examples/demo_prompts.txt --num_variants 3 --num_images_per_prompt 2 \
		--num_inference_steps 10 --guidance_scale 5.0 --output_dir $(DEMO)/candidates_sdxl
	HF_HUB_OFFLINE=1 $(PYTHON) eval_rewards.py --images_dir $(DEMO)/candidates_sd15 --rewards jpeg
	HF_HUB_OFFLINE=1 $(PYTHON) crf_filter.py --candidates_dir $(DEMO)/candidates_sd15 --output_dir $(DEMO)/filtered \
		--filter_rewards jpeg --overwrite
	@echo "candidates: $(DEMO)/candidates_sd15 and $(DEMO)/candidates_sdxl (images + metadata.jsonl + rewards.jsonl)"
	@echo "filtered training set: $(DEMO)/filtered (metadata.jsonl, crf_report.json, crf_preview.png)"

clean:
	rm -rf $(DEMO)
