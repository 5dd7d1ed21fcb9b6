"""What the CRAFT trainers write: checkpoints in diffusers' formats (for exact resume), validation grids with reward
curves, the LoRA / kohya / pipeline outputs, training_config.json, the model card and the Hub upload."""

import json
import math
import os
import shutil
import statistics

import craft_training as ct
import craft_utils as cu

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


def save_lora(pipeline_class, folder, unet, text_encoders):
    """pytorch_lora_weights.safetensors in diffusers' format: what load_lora_weights reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
              for name, module in {"unet": unet, **text_encoders}.items()}
    pipeline_class.save_lora_weights(folder, **layers)


def register_checkpoint_hooks(accelerator, unet, seam, is_lora, ema):
    """Checkpoints hold the trainable weights in diffusers' own formats (LoRA file / unet folder), not a pickle."""
    import torch

    names = {id(unet): "unet", **{id(m): n for n, m in ct.trainable_text_encoders(seam).items()}}

    def save(models, weights, folder):
        if accelerator.is_main_process:
            inner = {names[id(accelerator.unwrap_model(m))]: accelerator.unwrap_model(m) for m in models}
            if is_lora:
                save_lora(seam.pipeline_class, folder, inner.pop("unet"), inner)
            else:
                inner["unet"].save_pretrained(os.path.join(folder, "unet"))
            if ema is not None:
                ema.save_pretrained(os.path.join(folder, "unet_ema"))
        while weights:
            weights.pop()

    def load(models, folder):
        from diffusers import UNet2DConditionModel
        from diffusers.training_utils import _set_state_dict_into_text_encoder
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        inner = {}
        while models:
            model = accelerator.unwrap_model(models.pop())
            inner[names[id(model)]] = model
        if is_lora:
            state = seam.pipeline_class.lora_state_dict(folder)[0]
            unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
            set_peft_model_state_dict(inner["unet"], convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
            for name, module in inner.items():
                if name != "unet":
                    _set_state_dict_into_text_encoder(state, prefix=f"{name}.", text_encoder=module)
            for parameter in (p for module in inner.values() for p in module.parameters() if p.requires_grad):
                parameter.data = parameter.data.to(torch.float32)
        else:
            saved = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
            inner["unet"].load_state_dict(saved.state_dict())
        if ema is not None:
            from diffusers.training_utils import EMAModel

            ema.load_state_dict(EMAModel.from_pretrained(os.path.join(folder, "unet_ema"),
                                                         UNet2DConditionModel).state_dict())

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def find_checkpoint(args):
    """'latest' -> newest checkpoint-N in output_dir (None if there is none); else an existing folder."""
    if args.resume_from_checkpoint == "latest":
        found = [d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")] \
            if os.path.isdir(args.output_dir) else []
        return os.path.join(args.output_dir, max(found, key=lambda d: int(d.split("-")[1]))) if found else None
    for path in (args.resume_from_checkpoint, os.path.join(args.output_dir, args.resume_from_checkpoint)):
        if os.path.isdir(path):
            return path
    cu.fail(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder (absolute, or in {args.output_dir})")


def save_checkpoint(accelerator, args, step):
    if args.checkpoints_total_limit is not None and accelerator.is_main_process:
        old = sorted((d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")),
                     key=lambda d: int(d.split("-")[1]))
        for folder in old[: max(len(old) - args.checkpoints_total_limit + 1, 0)]:
            shutil.rmtree(os.path.join(args.output_dir, folder))
    accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{step}"))


def load_validation_rewards(args, accelerator):
    if not args.validation_rewards:
        return {}
    import craft_rewards

    return {name: craft_rewards.load_reward(name, args, accelerator.device) for name in args.validation_reward_names}


def validation_pipeline(args, accelerator, unet, vae, seam):
    pipe = seam.pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path, unet=accelerator.unwrap_model(unet), vae=vae, revision=args.revision,
        variant=args.variant, **seam.components, **seam.pipeline_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(accelerator.device)


def validate(args, accelerator, unet, vae, seam, rewards, step, ema=None):
    """Images for every validation prompt from fixed seeds -> validation/step-N.png, tracker, reward means."""
    import torch

    if not accelerator.is_main_process:
        return
    ct.offload(seam, vae, accelerator.device)
    model = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    for module in ct.trainable_text_encoders(seam).values():
        module.eval()
    pipe = validation_pipeline(args, accelerator, unet, vae, seam)
    images, prompts = [], []
    with torch.no_grad(), accelerator.autocast():
        for p, prompt in enumerate(args.validation_prompt):
            for i in range(args.num_validation_images):
                generator = torch.Generator().manual_seed(ct.derive(args.seed, "validation", p, i))
                images += pipe(prompt, num_inference_steps=args.validation_inference_steps,
                               generator=generator).images
                prompts.append(prompt)
    if ema is not None:
        ema.restore(model.parameters())
    model.train()
    for module in ct.trainable_text_encoders(seam).values():
        module.train()
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    cu.save_image_atomic(image_grid(images, args.num_validation_images), os.path.join(folder, f"step-{step:06d}.png"))
    logs = {f"validation/{name}": statistics.fmean(reward(images, prompts)) for name, reward in rewards.items()}
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
    del pipe
    if args.cache_latents != "no":
        ct.offload(seam, vae, "cpu")


def image_grid(images, columns):
    from PIL import Image

    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_outputs(args, unet, vae, seam, is_lora, text_encoders):
    if is_lora:
        save_lora(seam.pipeline_class, args.output_dir, unet, text_encoders)
        if args.output_kohya_format:
            from diffusers.utils import convert_state_dict_to_kohya
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file

            import torch

            # prefixes unet. / text_encoder. / text_encoder_2. become lora_unet_ / lora_te1_ / lora_te2_
            peft_state = {f"{name}.{k}": v for name, module in {"unet": unet, **text_encoders}.items()
                          for k, v in get_peft_model_state_dict(module).items()}
            kohya = convert_state_dict_to_kohya(peft_state)
            if "text_encoder_2" not in seam.components:  # kohya names SD1.x's one encoder lora_te_, SDXL's te1/te2
                kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
            alpha = float(args.lora_alpha or args.rank)  # the converter assumes alpha = rank
            kohya = {k: torch.tensor(alpha) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}
            save_file(kohya, os.path.join(args.output_dir, KOHYA_FILE))
    else:
        pipe = seam.pipeline_class.from_pretrained(
            args.pretrained_model_name_or_path, unet=unet, vae=vae, revision=args.revision, variant=args.variant,
            **seam.components, **seam.pipeline_kwargs)
        pipe.save_pretrained(args.output_dir)


def write_training_config(args, stats):
    import diffusers
    import torch

    report = None
    if args.train_data_dir and os.path.isfile(os.path.join(args.train_data_dir, "crf_report.json")):
        with open(os.path.join(args.train_data_dir, "crf_report.json")) as f:
            report = json.load(f)
    cu.write_json_atomic(os.path.join(args.output_dir, "training_config.json"), {
        "args": {k: v for k, v in vars(args).items() if k != "hub_token"}, "data": stats, "crf_report": report,
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__}})


def write_model_card(args, is_lora, stats):
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    kind = "LoRA" if is_lora else "full fine-tune"
    description = (
        f"# CRAFT {kind} of {args.pretrained_model_name_or_path}\n\n"
        "Aligned with human preference by CRAFT (Composite Reward Assisted Fine-Tuning): the base model generated "
        "its own candidates, reward models scored them, Composite Reward Filtering kept the images that beat the "
        "original-prompt image on every reward, and the model was fine-tuned with an advantage-weighted denoising "
        "loss on that set.\n\n"
        f"- training images: {stats['num_images']} ({stats['weights']})\n"
        f"- steps: {stats['steps']}, batch {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation, "
        f"learning rate {args.learning_rate}, resolution {args.resolution}\n")
    crf = os.path.join(args.train_data_dir or "", "crf_report.json")
    if args.train_data_dir and os.path.isfile(crf):
        with open(crf) as f:
            report = json.load(f)
        description += (f"- filter: {report['settings']['mode']} on {report['settings']['filter_rewards']}; kept "
                        f"{report['kept']} of {report['candidates']} candidates from {report['kept_groups']} prompts\n")
    grids = sorted(os.listdir(os.path.join(args.output_dir, "validation"))) \
        if os.path.isdir(os.path.join(args.output_dir, "validation")) else []
    if grids:
        description += f"\n![validation](validation/{grids[-1]})\n"
    if is_lora:
        description += ("\n```python\nfrom diffusers import DiffusionPipeline\n"
                        f"pipe = DiffusionPipeline.from_pretrained(\"{args.pretrained_model_name_or_path}\")\n"
                        f"pipe.load_lora_weights(\"{args.hub_model_id or args.output_dir}\", "
                        f"weight_name=\"{LORA_FILE}\")\n```\n")
    # a new card from diffusers' training template (load_or_create_model_card would first look on the Hub)
    card = ModelCard.from_template(
        ModelCardData(license="openrail++", library_name="diffusers", base_model=args.pretrained_model_name_or_path),
        template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description)
    tags = ["text-to-image", "diffusers", "craft", "diffusers-training"] + (["lora"] if is_lora else [])
    populate_model_card(card, tags=tags).save(os.path.join(args.output_dir, "README.md"))


def push_to_hub(args):
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id=args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                          exist_ok=True, token=args.hub_token).repo_id
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of CRAFT training",
                  ignore_patterns=["checkpoint-*", "checkpoint-*/**", f"{args.logging_dir}/**", "*.tmp", ".tmp-*"],
                  token=args.hub_token)
    return repo_id
