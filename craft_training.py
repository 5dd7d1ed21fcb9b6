"""Training plumbing shared by train_craft_sd15.py and train_craft_sdxl_lora.py.

Flags (the diffusers surface + CRAFT's), the training set (imagefolder with per-sample weights), the weighted
denoising loss and the loop with exact resume; what the loop writes lives in craft_outputs.py.
What differs between SD1.5 and SDXL (prompt encoding, the UNet's extra inputs, the pipeline class) comes in as a
`ModelSeam` from the script.
"""

import argparse
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import craft_outputs as co
import craft_utils as cu


# ----------------------------------------------------------------------------------------------------------------
# Flags


def add_training_args(parser, resolution):
    a = parser.add_argument
    a("--config", help="JSON or TOML file of flag defaults (keys = flag names); command-line flags win")
    a("--pretrained_model_name_or_path", required=True, help="base pipeline: Hub id or local folder")
    a("--revision")
    a("--variant", help="weights variant, e.g. fp16")
    a("--train_data_dir", help="imagefolder with metadata.jsonl (crf_filter.py's output)")
    a("--dataset_name", help="a Hugging Face dataset with images and captions instead of --train_data_dir")
    a("--image_column", default="image")
    a("--caption_column", default="text")
    a("--weight_column", default="weight",
      help="per-sample loss weight (CRAFT advantage); a set without it trains with weight 1 (plain SFT)")
    a("--resolution", type=int, default=resolution)
    a("--center_crop", action="store_true", help="center crop (default: random crop)")
    a("--random_flip", action="store_true")
    a("--cache_latents", choices=["auto", "yes", "no"], default="auto",
      help="encode images and captions once and free the VAE/text encoders (auto: sets of up to 2,000 images)")
    a("--proportion_empty_prompts", type=float, default=0.0, help="caption dropout, keeps guidance working")
    a("--train_batch_size", type=int, default=1)
    a("--num_train_epochs", type=int, default=100)
    a("--max_train_steps", type=int, help="total optimizer steps; overrides --num_train_epochs")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--learning_rate", type=float, default=5e-5)
    a("--scale_lr", action="store_true", help="multiply the lr by batch size x accumulation x processes")
    a("--lr_scheduler", default="constant",
      help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup")
    a("--lr_warmup_steps", type=int, default=0)
    a("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit: a quarter of Adam's state memory")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--snr_gamma", type=float, help="min-SNR loss weighting (5.0 is the usual value)")
    a("--noise_offset", type=float, default=0.0)
    a("--prediction_type", choices=["epsilon", "v_prediction"], help="default: the scheduler's")
    a("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    a("--allow_tf32", action="store_true")
    a("--rank", type=int, default=4, help="LoRA rank")
    a("--lora_alpha", type=int, help="LoRA alpha (default: --rank, i.e. scale 1)")
    a("--lora_target_modules", default="to_k,to_q,to_v,to_out.0", help="UNet modules that get a LoRA")
    a("--output_kohya_format", action="store_true",
      help="also write pytorch_lora_weights_kohya.safetensors for A1111/ComfyUI")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int)
    a("--resume_from_checkpoint", help="'latest' or a checkpoint folder (absolute, or inside --output_dir)")
    a("--validation_prompt", action="append", help="repeatable")
    a("--num_validation_images", type=int, default=4)
    a("--validation_steps", type=int, help="validate every N steps (instead of every --validation_epochs)")
    a("--validation_epochs", type=int, default=1, help="validate at the end of every N-th epoch")
    a("--validation_inference_steps", type=int, default=25)
    a("--validation_rewards", help="rewards of craft_rewards to score validation images with, e.g. jpeg,hpsv2.1")
    a("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    a("--logging_dir", default="logs")
    a("--output_dir", default="craft-model")
    a("--overwrite_output_dir", action="store_true")
    a("--push_to_hub", action="store_true")
    a("--hub_model_id")
    a("--hub_token")
    a("--seed", type=int, default=0)
    a("--dataloader_num_workers", type=int, default=0)
    a("--enable_xformers_memory_efficient_attention", action="store_true")
    import craft_rewards

    craft_rewards.add_reward_args(parser)  # the weights of --validation_rewards


def parse_training_args(parser, input_args):
    """argparse is the truth; a --config file only changes defaults, and unknown keys are refused."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    first, _ = pre.parse_known_args(input_args)
    if first.config:
        if not os.path.isfile(first.config):
            cu.fail(f"--config {first.config} does not exist")
        with open(first.config, "rb") as f:
            if first.config.endswith(".toml"):
                import tomllib

                values = tomllib.load(f)
            else:
                values = json.load(f)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            cu.fail(f"--config {first.config}: unknown key {unknown[0]!r}; keys are flag names without '--'")
        parser.set_defaults(**values)
        for action in parser._actions:  # a required flag given by the config is no longer required
            if action.dest in values:
                action.required = False
    args = parser.parse_args(input_args)
    if bool(args.train_data_dir) == bool(args.dataset_name):
        parser.error("give --train_data_dir or --dataset_name")
    if args.hub_token and args.report_to in ("wandb", "all"):
        parser.error("--hub_token with --report_to wandb would expose the token; log in with `hf auth login` instead")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401 (checked before any model loads)
        except ImportError:
            parser.error("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if not 0 <= args.proportion_empty_prompts <= 1:
        parser.error("--proportion_empty_prompts must be between 0 and 1")
    if args.validation_rewards:
        import craft_rewards

        args.validation_reward_names = craft_rewards.parse_reward_names(args.validation_rewards, "--validation_rewards")
    resuming = args.resume_from_checkpoint is not None
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not (resuming or args.overwrite_output_dir):
        cu.fail(f"{args.output_dir} is not empty; pass --overwrite_output_dir, --resume_from_checkpoint latest, "
                "or choose another --output_dir")
    return args


# ----------------------------------------------------------------------------------------------------------------
# The training set


@dataclass
class Example:
    image: object  # a path, or a PIL image for Hub datasets
    caption: str
    weight: float
    extra: dict = field(default_factory=dict)


def load_examples(args):
    """Read and check the whole training set before any model loads; returns (examples, note on weights)."""
    if args.dataset_name:
        from datasets import load_dataset

        try:
            dataset = load_dataset(args.dataset_name, split="train")
        except Exception as error:  # datasets raises many types
            cu.fail(f"could not load --dataset_name {args.dataset_name}: {str(error).splitlines()[0]}")
        for column in (args.image_column, args.caption_column):
            if column not in dataset.column_names:
                cu.fail(f"--dataset_name {args.dataset_name} has no column '{column}' "
                        f"(columns: {', '.join(dataset.column_names)})")
        rows = [dict(r) for r in dataset]
        source, folder = args.dataset_name, None
    else:
        folder = args.train_data_dir
        source = os.path.join(folder, cu.METADATA)
        if not os.path.isdir(folder):
            cu.fail(f"--train_data_dir {folder} does not exist")
        if not os.path.isfile(source):
            cu.fail(f"{folder} has no {cu.METADATA}: the training folder is an imagefolder (images + metadata.jsonl "
                    f"with file_name, {args.caption_column} and optionally {args.weight_column}), e.g. crf_filter.py's")
        rows = cu.read_jsonl(source)
    if not rows:
        cu.fail(f"{source} has no rows")
    has_weights = args.weight_column in rows[0]
    examples = []
    for number, row in enumerate(rows, start=1):
        where = f"{source}, row {number}"
        caption = row.get(args.caption_column)
        if not isinstance(caption, str):
            cu.fail(f"{where}: no '{args.caption_column}' caption; set --caption_column")
        weight = row.get(args.weight_column, 1.0) if has_weights else 1.0
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            cu.fail(f"{where}: weight {weight!r} must be a finite number >= 0")
        image = row[args.image_column] if folder is None else os.path.join(folder, str(row.get("file_name")))
        if folder is not None:
            cu.check_image(image, where)
        examples.append(Example(image, caption, float(weight), {"file_name": row.get("file_name")}))
    if not any(e.weight > 0 for e in examples):
        cu.fail(f"{source}: every weight is 0, nothing would train; check crf_filter.py's output")
    note = (f"weights from column '{args.weight_column}' (sum {sum(e.weight for e in examples):.2f})" if has_weights
            else f"no '{args.weight_column}' column: every sample has weight 1 (plain SFT)")
    return examples, note


def preprocess(example, resolution, center_crop, flip, crop_seed):
    """-> pixels in [-1, 1], original (h, w), crop top-left (y, x) in the resized image, as SDXL's time ids need.
    A flip mirrors the crop: its left edge becomes width - left - resolution."""
    import random

    from PIL import Image, ImageOps
    from torchvision.transforms import functional as F

    image = example.image if not isinstance(example.image, str) else Image.open(example.image)
    image = ImageOps.exif_transpose(image).convert("RGB")
    original_size = (image.height, image.width)
    image = F.resize(image, resolution, interpolation=F.InterpolationMode.BILINEAR)
    if center_crop:
        top, left = (image.height - resolution) // 2, (image.width - resolution) // 2
    else:
        rng = random.Random(crop_seed)
        top, left = rng.randint(0, image.height - resolution), rng.randint(0, image.width - resolution)
    resized_width = image.width
    image = F.crop(image, top, left, resolution, resolution)
    if flip:
        image, left = F.hflip(image), resized_width - left - resolution
    pixels = F.normalize(F.to_tensor(image), [0.5], [0.5])
    return pixels, original_size, (top, left)


def derive(*parts):
    """A 31-bit seed from any tuple: the randomness of a sample or a step depends only on what it is."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def flip_of(args, epoch, index):
    import random

    return args.random_flip and random.Random(derive(args.seed, "flip", epoch, index)).random() < 0.5


class ImageDataset:
    """Index -> what a training sample needs; pixels only when latents are not cached. Flips are drawn per epoch."""

    def __init__(self, examples, args, cached):
        self.examples, self.args, self.cached, self.epoch = examples, args, cached, 0

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        flip = flip_of(self.args, self.epoch, index)
        item = {"index": index, "flip": flip}
        if not self.cached:
            pixels, original_size, crop = preprocess(self.examples[index], self.args.resolution, self.args.center_crop,
                                                     flip, derive(self.args.seed, "crop", index))
            item.update(pixels=pixels, original_size=original_size, crop_top_left=crop)
        return item


def collate(items):
    import torch

    batch = {key: [item[key] for item in items] for key in items[0]}
    if "pixels" in batch:
        batch["pixels"] = torch.stack(batch["pixels"])
    return batch


class EpochPermutation:
    """A seeded shuffle per epoch (set_epoch), so a resumed run sees the same order."""

    def __init__(self, size, seed):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.size

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(derive(self.seed, "order", self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())


# ----------------------------------------------------------------------------------------------------------------
# The CRAFT loss


def weighted_denoising_loss(model_pred, target, weights, snr_weights=None):
    """L = mean_i [ w_i * s_i * mean_{c,h,w} (pred_i - target_i)^2 ]: per-sample MSE against the scheduler's
    target (noise or velocity), times the min-SNR factor s_i (1 without --snr_gamma) and the sample's weight w_i
    (its CRAFT advantage), averaged over the batch. A weight-0 sample adds nothing, gradient included."""
    per_sample = ((model_pred.float() - target.float()) ** 2).mean(dim=list(range(1, model_pred.dim())))
    if snr_weights is not None:
        per_sample = per_sample * snr_weights
    return (per_sample * weights).mean()


def min_snr_weights(noise_scheduler, timesteps, snr_gamma):
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    return weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)


# ----------------------------------------------------------------------------------------------------------------
# The model seam and the loop


@dataclass
class ModelSeam:
    """What a trainer script provides: the pipeline class, its frozen parts, and its conditioning."""

    pipeline_class: type
    components: dict  # pipeline parts besides unet/vae (text encoders, tokenizers); LoRA'd encoders train
    encode_prompts: Callable  # (components, captions) -> {name: tensor, batch first}
    unet_inputs: Callable  # (text condition, batch, latents) -> unet kwargs besides sample and timestep
    pipeline_kwargs: dict = field(default_factory=dict)


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    if args.allow_tf32:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def weight_dtype_of(accelerator):
    import torch

    # from the accelerator, not the flag: `accelerate config` may set it (the "unscale FP16 gradients" trap)
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def add_lora(unet, args):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank, init_lora_weights="gaussian",
                                target_modules=args.lora_target_modules.split(",")))


def add_text_encoder_lora(encoders, args):
    from peft import LoraConfig, inject_adapter_in_model

    # peft's own injection: transformers 5.2x's add_adapter asks for a peft (>= 0.22) not released yet
    config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank, init_lora_weights="gaussian",
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    for encoder in encoders:
        inject_adapter_in_model(config, encoder)


def trainable_text_encoders(seam):
    return {name: module for name, module in seam.components.items() if getattr(module, "peft_config", None)}


def peak_memory():
    """(GiB, label): the accelerator's peak allocation, or the process's peak RSS on a CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "peak GPU memory"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS (CPU)"


class Conditioner:
    """Latents and text conditions for a batch: from the one-time cache, or encoded now."""

    def __init__(self, args, examples, seam, vae, accelerator, weight_dtype, cache):
        import torch

        self.args, self.examples, self.seam, self.vae = args, examples, seam, vae
        self.device, self.weight_dtype, self.cache = accelerator.device, weight_dtype, cache
        self.components = seam.components  # train() swaps in the DDP-wrapped encoders when they train
        self.text_trains = bool(trainable_text_encoders(seam))
        self.cache_text = cache and not self.text_trains
        self.scaling = vae.config.scaling_factor
        if not cache:
            return
        from tqdm.auto import tqdm

        self.latents = {}
        flips = (False, True) if args.random_flip else (False,)
        keys = [(i, flip) for i in range(len(examples)) for flip in flips]
        for start in tqdm(range(0, len(keys), args.train_batch_size), desc="caching latents",
                          disable=not accelerator.is_local_main_process):
            chunk = keys[start: start + args.train_batch_size]
            prepared = [preprocess(examples[i], args.resolution, args.center_crop, flip, derive(args.seed, "crop", i))
                        for i, flip in chunk]
            mean, std = self.encode_pixels(torch.stack([p[0] for p in prepared]))
            for j, key in enumerate(chunk):
                self.latents[key] = (mean[j], std[j], prepared[j][1], prepared[j][2])
        if not self.cache_text:
            return
        captions = sorted({e.caption for e in examples} | {""})
        self.texts = {}
        for start in range(0, len(captions), args.train_batch_size):
            chunk = captions[start: start + args.train_batch_size]
            encoded = self.encode_text(chunk)
            for j, caption in enumerate(chunk):
                self.texts[caption] = {name: value[j] for name, value in encoded.items()}

    def encode_pixels(self, pixels):
        import torch

        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def encode_text(self, captions):
        import torch

        with torch.set_grad_enabled(self.text_trains):
            return self.seam.encode_prompts(self.components, captions)

    def __call__(self, batch, generator):
        """-> latents, text condition, sizes; the same random draws whether cached or not."""
        import torch

        n = len(batch["index"])
        drop = torch.rand(n, generator=generator) < self.args.proportion_empty_prompts
        captions = ["" if d else self.examples[i].caption for i, d in zip(batch["index"], drop.tolist())]
        if self.cache:
            parts = [self.latents[(i, f)] for i, f in zip(batch["index"], batch["flip"])]
            mean, std = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
            sizes = {"original_size": [p[2] for p in parts], "crop_top_left": [p[3] for p in parts]}
        else:
            mean, std = self.encode_pixels(batch["pixels"])
            sizes = {"original_size": batch["original_size"], "crop_top_left": batch["crop_top_left"]}
        if self.cache_text:
            text = {name: torch.stack([self.texts[c][name] for c in captions]) for name in self.texts[""]}
        else:
            text = self.encode_text(captions)
        sample = torch.randn(mean.shape, generator=generator).to(self.device)
        latents = (mean + std * sample) * self.scaling
        return latents, text, sizes


def train(args, accelerator, unet, vae, noise_scheduler, seam, examples, weights_note, ema=None):
    """The CRAFT fine-tune: weighted denoising loss on the filtered set, exact resume, validation, outputs."""
    import torch
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    is_lora = getattr(unet, "peft_config", None) is not None
    weight_dtype = weight_dtype_of(accelerator)
    if args.prediction_type:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    text_encoders = trainable_text_encoders(seam)
    for module in seam.components.values():
        if isinstance(module, torch.nn.Module):
            module.to(accelerator.device, weight_dtype)
    # encode the (small) set first, then free the VAE and frozen encoders before the UNet arrives: a lower peak
    cache = args.cache_latents == "yes" or (args.cache_latents == "auto" and len(examples) <= 2000)
    conditioner = Conditioner(args, examples, seam, vae, accelerator, weight_dtype, cache)
    if cache:
        offload(seam, vae, "cpu")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if is_lora:
        unet.to(accelerator.device, weight_dtype)
        cast_training_params(unet, torch.float32)  # trainable weights stay fp32: no "unscale FP16 gradients"
    else:
        unet.to(accelerator.device)
    if ema is not None:
        ema.to(accelerator.device)
    for module in text_encoders.values():
        cast_training_params(module, torch.float32)
        if args.gradient_checkpointing:
            module.gradient_checkpointing_enable()
    params = [p for m in (unet, *text_encoders.values()) for p in m.parameters() if p.requires_grad]

    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    dataset = ImageDataset(examples, args, cache)
    sampler = EpochPermutation(len(dataset), args.seed)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                             collate_fn=collate, num_workers=args.dataloader_num_workers)
    steps_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    unet, *wrapped, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        unet, *text_encoders.values(), optimizer, dataloader, lr_scheduler)
    co.register_checkpoint_hooks(accelerator, accelerator.unwrap_model(unet), seam, is_lora, ema)
    conditioner.components = {**seam.components, **dict(zip(text_encoders, wrapped))}  # DDP syncs their grads

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        accelerator.init_trackers("craft", config={k: v for k, v in vars(args).items()
                                                   if isinstance(v, (int, float, str, bool))})
    global_step = 0
    if args.resume_from_checkpoint:
        checkpoint = co.find_checkpoint(args)
        if checkpoint is None:
            accelerator.print(f"no checkpoint in {args.output_dir}: starting a new run")
        else:
            accelerator.load_state(checkpoint)
            global_step = int(os.path.basename(os.path.normpath(checkpoint)).split("-")[1])
            accelerator.print(f"resumed from {checkpoint} at step {global_step}")
    first_epoch, skip_batches = divmod(global_step, steps_per_epoch)
    skip_batches *= args.gradient_accumulation_steps

    rewards = co.load_validation_rewards(args, accelerator)
    accelerator.print(f"{len(examples)} training images ({weights_note}); latents {'cached' if cache else 'encoded'}"
                      f", text {'cached' if conditioner.cache_text else 'encoded each step'}"
                      + (" (the text encoders train)" if text_encoders else "")
                      + f"; {max_steps} steps of {args.train_batch_size} x {args.gradient_accumulation_steps}"
                      f" x {accelerator.num_processes} images")
    progress = tqdm(range(max_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    started, losses, first_step_done, first_step = time.time(), [], None, 0
    for epoch in range(first_epoch, epochs):
        sampler.set_epoch(epoch)
        dataset.epoch = epoch
        unet.train()
        for module in wrapped:
            module.train()
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if epoch == first_epoch else dataloader
        for step, batch in enumerate(batches, start=skip_batches if epoch == first_epoch else 0):
            generator = torch.Generator().manual_seed(derive(args.seed, "step", epoch, step, accelerator.process_index))
            with accelerator.accumulate(unet, *wrapped):
                latents, text, sizes = conditioner(batch, generator)
                noise = torch.randn(latents.shape, generator=generator).to(latents.device)
                if args.noise_offset:
                    offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
                    noise = noise + args.noise_offset * offset.to(latents.device)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          generator=generator).to(latents.device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                    noise_scheduler.get_velocity(latents, noise, timesteps)
                model_pred = unet(noisy.to(weight_dtype), timesteps,
                                  **seam.unet_inputs(text, sizes, latents)).sample
                weights = torch.tensor([examples[i].weight for i in batch["index"]], device=latents.device)
                snr = min_snr_weights(noise_scheduler, timesteps, args.snr_gamma) if args.snr_gamma else None
                loss = weighted_denoising_loss(model_pred, target, weights, snr)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()).mean().item())
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if first_step_done is None:
                first_step_done, first_step = time.time(), global_step
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            logs = {"loss": statistics.fmean(losses), "lr": lr_scheduler.get_last_lr()[0]}
            losses = []
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                co.save_checkpoint(accelerator, args, global_step)
            if args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0:
                co.validate(args, accelerator, unet, vae, seam, rewards, global_step, ema)
            if global_step >= max_steps:
                break
        if args.validation_prompt and not args.validation_steps and (epoch + 1) % args.validation_epochs == 0:
            co.validate(args, accelerator, unet, vae, seam, rewards, global_step, ema)
        if global_step >= max_steps:
            break
    progress.close()
    loop_end = time.time()
    accelerator.wait_for_everyone()
    memory_gib, memory_kind = peak_memory()
    memory = f"{memory_kind} {memory_gib:.2f} GiB"
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(final_unet.parameters())
        co.save_outputs(args, final_unet, vae, seam, is_lora, text_encoders)
        statistics_ = {"num_images": len(examples), "weights": weights_note, "latents_cached": cache,
                       "weight_sum": sum(e.weight for e in examples), "steps": global_step,
                       "seconds": round(loop_end - started, 1), "memory": memory, "peak_memory_gib": memory_gib,
                       "seconds_per_step": (loop_end - first_step_done) / max(global_step - first_step, 1)
                       if first_step_done else None}
        co.write_training_config(args, statistics_)
        co.write_model_card(args, is_lora, statistics_)
        if args.push_to_hub:
            co.push_to_hub(args)
        accelerator.print(f"trained {global_step} steps in {statistics_['seconds']} s, {memory}; "
                          f"saved to {args.output_dir}")
    accelerator.end_training()


def offload(seam, vae, device):
    import torch

    vae.to(device)
    training = trainable_text_encoders(seam)
    for name, module in seam.components.items():
        if isinstance(module, torch.nn.Module) and name not in training:
            module.to(device)
    if device == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
