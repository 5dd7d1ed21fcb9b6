"""What the CRAFT trainers write besides checkpoints, for any model family: the LoRA and kohya files, validation grids
with reward curves, training_config.json, the model card and the Hub upload. The trainer scripts build the models
and pipelines and hand them in; the output folder itself and the checkpoints are craft_checkpoints.py's."""

import json
import os
import statistics
import time

import craft_drift as cdr
import craft_reward_models as cm
import craft_utils as cu

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# LoRA files


def save_lora(pipeline_class, folder, models):
    """pytorch_lora_weights.safetensors in diffusers' format, what load_lora_weights reads. `models`: name ->
    LoRA'd module, named as the pipeline names it (unet / transformer, text_encoder, text_encoder_2)."""
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    # diffusers' SD examples rename peft's keys to the UNet's older LoRA names; its FLUX examples keep peft's
    layers = {f"{name}_lora_layers": get_peft_model_state_dict(module) for name, module in models.items()}
    layers = {key: state if key == "transformer_lora_layers" else convert_state_dict_to_diffusers(state)
              for key, state in layers.items()}
    # the LoRA configs ride along (as diffusers' examples save them): without them a loader assumes alpha = rank
    pipeline_class.save_lora_weights(folder, **layers, **_collate_lora_metadata(models))


def save_kohya(folder, models, alpha, one_text_encoder):
    """pytorch_lora_weights_kohya.safetensors for A1111/ComfyUI, for SD1.x/SDXL: prefixes unet. / text_encoder. /
    text_encoder_2. become lora_unet_ / lora_te1_ / lora_te2_; kohya names an SD1.x model's only encoder lora_te_.
    (diffusers' converter knows no other denoiser name: a transformer needs its own mapping.)"""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_state = {f"{name}.{key}": value for name, module in models.items()
                  for key, value in get_peft_model_state_dict(module).items()}
    kohya = convert_state_dict_to_kohya(peft_state)
    if one_text_encoder:
        kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
    # the converter writes alpha = rank; the LoRA's own alpha is what scales it
    kohya = {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}
    save_file(kohya, os.path.join(folder, KOHYA_FILE))


# ----------------------------------------------------------------------------------------------------------------
# Validation


def load_validation_rewards(args, accelerator):
    """The --validation_rewards models, on the main process only (it alone validates)."""
    if not args.validation_rewards or not accelerator.is_main_process:
        return {}
    return {name: cm.load_reward(name, args, accelerator.device) for name in args.validation_reward_names}


def log_validation(pipeline, args, accelerator, rewards, step, prompt_inputs=None, **pipeline_kwargs):
    """Images for every validation prompt from fixed seeds -> validation/step-N/ (each image) and validation/step-N.png
    (the grid: a row per prompt, a column per seed, each image's rewards under it), validation/step-N.json (each
    image's rewards and pixel statistics), the trackers: reward means and the drift statistics (craft_drift: pixel
    statistics, diversity across the seeds). After step 0 (the starting model), the images are compared with step
    0's, and a line warns when craft_drift sees signs of reward hacking.
    `prompt_inputs`: prompt -> the pipeline's inputs in place of the text (embeddings computed once, so large text
    encoders need not come back to the GPU); `pipeline_kwargs`: what the family's pipeline call needs besides
    (size, guidance...)."""
    import torch

    pipeline.set_progress_bar_config(disable=True)
    images, prompts = [], []
    with torch.no_grad(), accelerator.autocast():
        for p, prompt in enumerate(args.validation_prompt):
            for i in range(args.num_validation_images):
                generator = torch.Generator().manual_seed(cu.derive(args.seed, "validation", p, i))
                inputs = prompt_inputs[prompt] if prompt_inputs else {"prompt": prompt}
                images += pipeline(**inputs, num_inference_steps=args.validation_inference_steps,
                                   generator=generator, **pipeline_kwargs).images
                prompts.append(prompt)
    count = args.num_validation_images
    scores = {name: reward(images, prompts) for name, reward in rewards.items()}
    folder = os.path.join(args.output_dir, "validation", f"step-{step:06d}")  # each image as made, then the grid
    os.makedirs(folder, exist_ok=True)
    for index, image in enumerate(images):
        cu.save_image_atomic(image, os.path.join(folder, f"prompt{index // count:02d}-image{index % count:02d}.png"))
    tiles = [images[p * count: (p + 1) * count] for p in range(len(args.validation_prompt))]
    captions = [["\n".join(f"{name} {values[p * count + i]:.3f}" for name, values in scores.items())
                 for i in range(count)] for p in range(len(tiles))] if scores else None
    grid = cu.labelled_grid(tiles, args.validation_prompt, [f"step {step}, seed {i + 1}" for i in range(count)],
                            captions, tile_size=max(256, min(images[0].width, 512)))
    cu.save_image_atomic(grid, folder + ".png")
    logs = {f"validation/{name}": statistics.fmean(values) for name, values in scores.items()}
    # what the images drift to while the rewards rise (README: Troubleshooting, reward hacking)
    stats = [cdr.pixel_stats(image) for image in images]
    logs.update({f"drift/{name}": statistics.fmean(s[name] for s in stats) for name in cdr.STATISTICS})
    diversity = [cdr.diversity(row) for row in tiles] if count > 1 else None
    if diversity:
        logs["drift/diversity"] = statistics.fmean(diversity)
    sampling = {name: getattr(args, name, None) for name in (
        "validation_inference_steps", "validation_guidance_scale", "validation_model_name_or_path", "seed")}
    record = {"prompts": prompts, "sampling": sampling, "rewards": scores, "stats": stats, "diversity": diversity}
    cu.write_json_atomic(folder + ".json", record)
    accelerator.log(logs, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step,
                                      dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=pr) for im, pr in zip(images, prompts)]}, step=step)
    if logs:
        accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
    start = os.path.join(args.output_dir, "validation", f"step-{0:06d}.json")
    if step and os.path.isfile(start):
        with open(start, encoding="utf-8") as f:
            signs = hacking_signs_since(json.load(f), record, trained_rewards(args))
        if signs:
            accelerator.print(f"reward hacking suspected (validation at step {step} against step 0): "
                              f"{'; '.join(signs)} (README: Troubleshooting)")


def trained_rewards(args):
    """The rewards the training set was filtered on (its crf_report.json), [] when it does not say."""
    return cdr.filter_rewards(crf_report(args)) or []


def hacking_signs_since(start, now, trained):
    """craft_drift's signs of reward hacking in one validation against the starting model's, image by image (same
    prompts, same seeds); none when the validation prompts or sampling changed between the two (a resume may change
    them)."""
    if start["prompts"] != now["prompts"] or start.get("sampling") != now.get("sampling"):
        return []
    rewards = {}
    for name in set(start["rewards"]) & set(now["rewards"]):
        row = cdr.paired_delta(now["rewards"][name], start["rewards"][name])
        rewards[name] = {**row, "mean_delta": row["delta"]}
    drift = {name: cdr.paired_delta([s[name] for s in now["stats"]], [s[name] for s in start["stats"]])
             for name in cdr.STATISTICS}
    diversity = cdr.paired_delta(now["diversity"], start["diversity"]) if now["diversity"] and start["diversity"] \
        else None
    return cdr.hacking_signs(rewards, trained, drift, diversity)


def lora_copied_onto(source, target):
    """`target`, a denoiser of `source`'s architecture (the distilled sibling of the base being trained), with a copy
    of `source`'s LoRA: the model a validation run shows as users will run the LoRA."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    target.add_adapter(source.peft_config["default"])
    set_peft_model_state_dict(target, get_peft_model_state_dict(source), adapter_name="default")
    return target.eval()


# ----------------------------------------------------------------------------------------------------------------
# The run's record: timing, training_config.json, model card, Hub


def peak_memory():
    """(GiB, label): the accelerator's peak allocation, or the process's peak RSS on a CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "peak GPU memory"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS (CPU)"


class StepClock:
    """The loop's wall time and seconds per optimizer step, the first step (warm-up, allocation) left out."""

    def __init__(self):
        self.started, self.first_done, self.first_step = time.time(), None, 0

    def step_done(self, global_step):
        if self.first_done is None:
            self.first_done, self.first_step = time.time(), global_step

    def summary(self, global_step):
        ended = time.time()
        memory_gib, memory_kind = peak_memory()
        per_step = (ended - self.first_done) / max(global_step - self.first_step, 1) if self.first_done else None
        return {"steps": global_step, "seconds": round(ended - self.started, 1), "seconds_per_step": per_step,
                "memory": f"{memory_kind} {memory_gib:.2f} GiB", "peak_memory_gib": memory_gib}


def run_stats(examples, weights_note, cache, clock, global_step):
    """What training_config.json records of the run: the training set, the cache, steps, seconds and peak memory."""
    return {"num_images": len(examples), "weights": weights_note, "weight_sum": sum(e.weight for e in examples),
            "latents_cached": cache, **clock.summary(global_step)}


def crf_report(args):
    path = os.path.join(args.train_data_dir or "", "crf_report.json")
    if not (args.train_data_dir and os.path.isfile(path)):
        return None
    with open(path) as f:
        return json.load(f)


def write_training_config(args, stats):
    import diffusers
    import torch

    cu.write_json_atomic(os.path.join(args.output_dir, "training_config.json"), {
        "args": {k: v for k, v in vars(args).items() if k != "hub_token"}, "data": stats, "crf_report": crf_report(args),
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__}})


def write_model_card(args, stats, is_lora, license, model_tags):
    """README.md for the Hub; `license`: the base model's (a fine-tune inherits it; "other" for custom licences);
    `model_tags`: the family's Hub tags (e.g. stable-diffusion-xl)."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    kind = "LoRA" if is_lora else "full fine-tune"
    if args.loss == "dpo":
        description = (
            f"# Diffusion-DPO {kind} of {args.pretrained_model_name_or_path}\n\n"
            "Trained with Diffusion-DPO (Wallace et al., 2023), the baseline CRAFT is compared with: the base model "
            "generated its own candidates, reward models scored them, and each prompt's best image against its worst "
            f"(crf_filter.py --mode pairs) taught the model, against the frozen base, beta {args.beta_dpo:g}.\n\n")
    else:
        description = (
            f"# CRAFT {kind} of {args.pretrained_model_name_or_path}\n\n"
            "Aligned with human preference by CRAFT (Composite Reward Assisted Fine-Tuning): the base model "
            "generated its own candidates, reward models scored them, Composite Reward Filtering kept the images that "
            "beat the original-prompt image on every reward, and the model was fine-tuned with an advantage-weighted "
            "denoising loss on that set.\n\n")
    description += (
        f"- training {'pairs' if args.loss == 'dpo' else 'images'}: {stats['num_images']} ({stats['weights']})\n"
        f"- steps: {stats['steps']}, batch {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation, "
        f"learning rate {args.learning_rate}, resolution {args.resolution}\n")
    report = crf_report(args)
    if report:
        description += (f"- filter: {report['settings']['mode']} on {report['settings']['filter_rewards']}; kept "
                        f"{report['kept']} of {report['candidates']} candidates from {report['kept_groups']} prompts\n")
    grids = sorted(name for name in os.listdir(os.path.join(args.output_dir, "validation"))
                   if name.endswith(".png") and name != f"step-{0:06d}.png") \
        if os.path.isdir(os.path.join(args.output_dir, "validation")) else []  # step 0: the starting model
    if grids:
        description += f"\n![validation](validation/{grids[-1]})\n"
    if is_lora:
        description += ("\n```python\nfrom diffusers import DiffusionPipeline\n"
                        f"pipe = DiffusionPipeline.from_pretrained(\"{args.pretrained_model_name_or_path}\")\n"
                        f"pipe.load_lora_weights(\"{args.hub_model_id or args.output_dir}\", "
                        f"weight_name=\"{LORA_FILE}\")\n```\n")
    # a new card from diffusers' training template (load_or_create_model_card would first look on the Hub)
    card = ModelCard.from_template(
        ModelCardData(license=license, library_name="diffusers", base_model=args.pretrained_model_name_or_path),
        template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description)
    tags = ["text-to-image", "diffusers", *model_tags, "diffusion-dpo" if args.loss == "dpo" else "craft",
            "diffusers-training"]
    tags += ["lora"] if is_lora else []
    populate_model_card(card, tags=tags).save(os.path.join(args.output_dir, "README.md"))


def push_to_hub(args):
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    try:
        repo_id = create_repo(repo_id=repo_id, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of CRAFT training",
                      ignore_patterns=["checkpoint-*", "checkpoint-*/**", f"{args.logging_dir}/**", ".*"],
                      token=args.hub_token)
    except Exception as error:  # offline, no login, no rights, a network fault: the weights are saved all the same
        cu.fail(f"the upload to the Hub ({repo_id}) failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                f"the weights are saved in {args.output_dir}: once online and logged in (`hf auth login`), upload them "
                f"with `hf upload {repo_id} {args.output_dir} --exclude 'checkpoint-*/**' --exclude "
                f"'{args.logging_dir}/**' --exclude '.*'`")
    print(f"uploaded to https://huggingface.co/{repo_id}")
    return repo_id


def finish(args, stats, is_lora, license, model_tags):
    """training_config.json, the model card (write_model_card's arguments), the Hub upload with --push_to_hub, and
    the run's last line (main process)."""
    write_training_config(args, stats)
    write_model_card(args, stats, is_lora=is_lora, license=license, model_tags=model_tags)
    print(f"trained {stats['steps']} steps in {stats['seconds']} s, {stats['memory']}; saved to {args.output_dir}")
    if args.push_to_hub:
        push_to_hub(args)
