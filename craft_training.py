"""What the CRAFT trainers share and a fork for another model family keeps: the flags (the diffusers surface +
CRAFT's), the training set (an imagefolder with per-sample weights) and its checks, per-sample preprocessing and
seeds, the one-time cache of latents and caption embeddings (given the script's encode functions) and the small
pieces of the weighted loss. The models, the loop, the noise and timestep draw, the target and the loss itself are
written in each trainer script; what the loop writes (checkpoints, validation, exports) lives in craft_outputs.py.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass

import craft_outputs as co
import craft_utils as cu

AUTO_CACHE_LIMIT = 2000  # --cache_latents auto caches sets of up to this many images


# ----------------------------------------------------------------------------------------------------------------
# Flags


def add_training_args(parser, resolution, beta_dpo=None):
    """resolution, beta_dpo: the model family's defaults (diffusers' examples use 2500 for SD1.5, 5000 for SDXL);
    without beta_dpo the script trains the CRAFT loss only (no --loss flag)."""
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
      help="per-sample loss weight (the CRAFT advantage); 'none' trains every sample with weight 1 (plain SFT)")
    if beta_dpo is None:
        parser.set_defaults(loss="craft", beta_dpo=None, rejected_image_column=None)
    else:
        a("--loss", choices=["craft", "dpo"], default="craft",
          help="craft: the advantage-weighted denoising loss; dpo: the Diffusion-DPO baseline, on a folder of "
               "preference pairs (crf_filter.py --mode pairs) against the frozen base model")
        a("--beta_dpo", type=float, default=beta_dpo,
          help="--loss dpo: the strength of the tie to the base model (larger keeps the model closer to it)")
        a("--rejected_image_column", default="rejected",
          help="--loss dpo with --dataset_name: the rejected image's column (a pairs folder: rejected_file_name)")
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
      choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    a("--lr_warmup_steps", type=int, default=0)
    a("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit: a quarter of Adam's state memory")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: accelerate's config")
    a("--allow_tf32", action="store_true")
    a("--rank", type=int, default=4, help="LoRA rank")
    a("--lora_alpha", type=int, help="LoRA alpha (default: --rank, i.e. scale 1)")
    a("--lora_target_modules", default="to_k,to_q,to_v,to_out.0", help="the denoiser's modules that get a LoRA")
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


def add_ddpm_args(parser):
    """The flags of families trained with DDPM's noise-prediction objective (SD1.5, SDXL): a script for such a family
    adds them; flow-matching scripts have their own (--weighting_scheme)."""
    parser.add_argument("--snr_gamma", type=float, help="min-SNR loss weighting (5.0 is the usual value)")
    parser.add_argument("--noise_offset", type=float, default=0.0)
    parser.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], help="default: the scheduler's")


def add_flow_matching_args(parser):
    """The flags of flow-matching families (FLUX, Z-Image, FLUX.2 [klein]): how each sample's sigma is drawn (the
    schemes as diffusers' scripts name them; the draw itself is the script's), and the 4-bit base."""
    parser.add_argument("--weighting_scheme", choices=["none", "logit_normal", "mode"], default="none",
                        help="how each sample's sigma is drawn: none = uniform")
    parser.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal: mean")
    parser.add_argument("--logit_std", type=float, default=1.0, help="logit_normal: standard deviation")
    parser.add_argument("--mode_scale", type=float, default=1.29, help="mode: scale")
    parser.add_argument("--quantize_base", choices=["nf4"],
                        help="load the frozen base transformer in 4-bit NF4 (bitsandbytes); the LoRA trains in fp32")


def nf4_config(weight_dtype):
    """bitsandbytes 4-bit NF4 for a frozen base (--quantize_base nf4); its matmuls compute in the training dtype."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=weight_dtype)


def check_quantize_base(args, weight_dtype):
    """--quantize_base nf4 where diffusers cannot quantize (it needs a GPU): one line, before any model loads."""
    if not args.quantize_base:
        return
    from diffusers.quantizers import DiffusersAutoQuantizer

    try:
        DiffusersAutoQuantizer.from_config(nf4_config(weight_dtype)).validate_environment()
    except RuntimeError as error:
        cu.fail(f"--quantize_base nf4 needs a GPU: diffusers says {str(error).splitlines()[0]!r}; leave it out on the "
                "CPU")


def parse_training_args(parser, input_args):
    """argparse is the truth; a --config file only changes defaults, and unknown keys are refused."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    first, _ = pre.parse_known_args(input_args)
    if first.config:
        if not os.path.isfile(first.config):
            cu.fail(f"--config {first.config} does not exist")
        import tomllib

        try:
            with open(first.config, "rb") as f:
                values = tomllib.load(f) if first.config.endswith(".toml") else json.load(f)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
            cu.fail(f"--config {first.config} is not valid {'TOML' if first.config.endswith('.toml') else 'JSON'} "
                    f"({error}); fix the file")
        if not isinstance(values, dict):
            cu.fail(f"--config {first.config} must hold an object of flag names and values")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            cu.fail(f"--config {first.config}: unknown key {unknown[0]!r}; keys are flag names without '--'")
        parser.set_defaults(**values)
        for action in parser._actions:  # a required flag given by the config is no longer required
            if action.dest in values:
                action.required = False
    args = parser.parse_args(input_args)
    for action in parser._actions:  # a NaN or infinite value trains every weight to NaN
        value = getattr(args, action.dest, None)
        if action.type is float and value is not None and not math.isfinite(value):
            parser.error(f"--{action.dest} must be a finite number (got {value})")
    if not args.learning_rate > 0:
        parser.error(f"--learning_rate must be > 0 (got {args.learning_rate})")
    if bool(args.train_data_dir) == bool(args.dataset_name):
        parser.error("give --train_data_dir or --dataset_name")
    if args.hub_token and args.report_to in ("wandb", "all"):
        parser.error("--hub_token with --report_to wandb would expose the token; log in with `hf auth login` instead")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401 (checked before any model loads)
        except ImportError:
            parser.error("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if args.beta_dpo is not None and args.beta_dpo < 0:
        parser.error("--beta_dpo must be >= 0 (a negative value would reverse the preference)")
    if args.loss == "dpo" and getattr(args, "snr_gamma", None):
        parser.error("--snr_gamma weights the CRAFT loss's terms; Diffusion-DPO's (--loss dpo) has none")
    if not 0 <= args.proportion_empty_prompts <= 1:
        parser.error("--proportion_empty_prompts must be between 0 and 1")
    for flag in ("checkpointing_steps", "checkpoints_total_limit", "validation_steps", "validation_epochs",
                 "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.rank < 1:
        parser.error(f"--rank must be at least 1 (got {args.rank})")
    if args.lr_warmup_steps < 0:
        parser.error(f"--lr_warmup_steps must be >= 0 (got {args.lr_warmup_steps})")
    for tracker in [] if args.report_to in ("all", "none") else args.report_to.split(","):
        if importlib.util.find_spec(tracker) is None:  # accelerate would only warn, and log nothing
            parser.error(f"--report_to {tracker}: {tracker} is not installed; pip install {tracker}, or pass "
                         "--report_to none")
    if args.validation_rewards and not args.validation_prompt:
        parser.error("--validation_rewards scores the validation images: give --validation_prompt too")
    if args.validation_rewards:
        import craft_rewards

        args.validation_reward_names = craft_rewards.parse_reward_names(args.validation_rewards, "--validation_rewards")
    co.check_output_dir(args)
    return args


def check_model_family(path, revision, script, pipeline_class, flag=None):
    """Refuse, in one line, a pipeline of another family than the one `script` trains (its PIPELINE_CLASS), naming
    the script that trains that family, beside `script` or in the pack: whatever the scripts are called, a fork trains
    its own family and a new script needs no edit here. An image-to-image or inpainting class counts as its family's
    text-to-image pipeline (the same weights). A folder without model_index.json goes on to the script's loading.
    `flag`: the flag of a second model of the same family (a validation sibling), named instead."""
    import glob

    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except (OSError, ValueError):  # not a pipeline folder, or not reachable: loading the model says why
        return
    cu.check_pipeline_folder(path, index)
    class_name = text_to_image_class(index.get("_class_name"))
    if class_name == pipeline_class:
        return
    if flag:
        cu.fail(f"{flag} {path} is a {class_name}; it must be a {pipeline_class}, the family "
                f"{os.path.basename(script)} trains")
    script = os.path.abspath(script)
    folders = dict.fromkeys([os.path.dirname(script), os.path.dirname(os.path.abspath(__file__))])
    others = [os.path.basename(other) if os.path.dirname(other) == os.path.dirname(script) else other
              for folder in folders for other in sorted(glob.glob(os.path.join(glob.escape(folder), "*.py")))
              if other != script and trained_pipeline_class(other) == class_name]
    if others:
        cu.fail(f"{path} is a {class_name}; {os.path.basename(script)} trains {pipeline_class}: use "
                f"{' or '.join(others)}")
    cu.fail(f"{path} is a {class_name}; {os.path.basename(script)} trains {pipeline_class}, and no script of the pack "
            f"trains {class_name}: fork the one closest to it (README: Forking a script for your model)")


def text_to_image_class(class_name):
    """The text-to-image pipeline class of the family `class_name` belongs to (diffusers' AutoPipeline tables:
    StableDiffusionImg2ImgPipeline -> StableDiffusionPipeline); the name itself where the tables have none."""
    from diffusers.pipelines import auto_pipeline

    for tasks in (auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING):
        family = next((key for key, cls in tasks.items() if cls.__name__ == class_name), None)
        if family in auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING:
            return auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING[family].__name__
    return class_name


def trained_pipeline_class(script):
    """The PIPELINE_CLASS a trainer script sets at its top, read from its source (nothing is imported); None for
    other files."""
    import ast

    with open(script, encoding="utf-8", errors="replace") as f:
        source = f.read()
    if "PIPELINE_CLASS" not in source:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and \
                any(isinstance(target, ast.Name) and target.id == "PIPELINE_CLASS" for target in node.targets):
            return node.value.value
    return None


# ----------------------------------------------------------------------------------------------------------------
# The training set


@dataclass
class Example:
    image: object  # a path, or a PIL image for Hub datasets
    caption: str
    weight: float
    rejected: object = None  # --loss dpo: the pair's rejected image, as `image`


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
    if folder is not None:
        cu.refuse_repeated_rows(rows, source)
    rejected_column = args.rejected_image_column if folder is None else "rejected_file_name"
    is_pairs = all(rejected_column in row for row in rows)
    if args.loss == "dpo" and not is_pairs:
        if folder is None and rejected_column not in dataset.column_names:
            cu.fail(f"--dataset_name {args.dataset_name} has no column '{rejected_column}' for the rejected image; set "
                    f"--rejected_image_column (columns: {', '.join(dataset.column_names)})")
        first = next(number for number, row in enumerate(rows, start=1) if rejected_column not in row)
        cu.fail(f"{source}, row {first}: no '{rejected_column}' (the rejected image): --loss dpo trains on preference "
                "pairs; make them with crf_filter.py --mode pairs")
    has_weights = args.weight_column != "none" and args.loss == "craft"
    if has_weights and is_pairs and not any(args.weight_column in row for row in rows):
        cu.fail(f"{source} holds preference pairs (crf_filter.py --mode pairs): "
                + ("train them with --loss dpo" if args.beta_dpo is not None else "this script has no --loss dpo")
                + ", give the CRAFT set (crf_filter.py's default mode), or --weight_column none for plain SFT on "
                "the preferred images")
    if has_weights:
        missing = [number for number, row in enumerate(rows, start=1) if args.weight_column not in row]
        if len(missing) == len(rows):
            cu.fail(f"{source}: no row has a '{args.weight_column}' column; name the weight column with "
                    "--weight_column, or pass --weight_column none to train plain SFT (every weight 1)")
        if missing:
            cu.fail(f"{source}, row {missing[0]}: no '{args.weight_column}' value, though other rows have one; "
                    "give every row a weight")
    examples = []
    for number, row in enumerate(rows, start=1):
        where = f"{source}, row {number}"
        caption = row.get(args.caption_column)
        if not isinstance(caption, str):
            cu.fail(f"{where}: no '{args.caption_column}' caption; set --caption_column")
        weight = row[args.weight_column] if has_weights else 1.0
        # finite in the float32 the loss computes in, too (1e39 is a JSON number and float32's inf)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0 or abs(weight) > 3.4e38:
            cu.fail(f"{where}: weight {weight!r} must be a finite number >= 0 (below 3.4e38, float32's largest)")
        image = row[args.image_column] if folder is None else cu.path_in_folder(folder, row.get("file_name"), where)
        rejected = None
        if args.loss == "dpo":
            if row[rejected_column] is None:
                cu.fail(f"{where}: no rejected image ('{rejected_column}' is empty); give every pair both images")
            rejected = row[rejected_column] if folder is None else cu.path_in_folder(folder, row[rejected_column],
                                                                                     where, rejected_column)
        if folder is not None:
            for path in (image, rejected) if rejected else (image,):
                cu.check_image(path, where)
        examples.append(Example(image, caption, float(weight), rejected))
    if not any(e.weight > 0 for e in examples):
        cu.fail(f"{source}: every weight is 0, nothing would train; check crf_filter.py's output")
    if args.loss == "dpo":
        note = f"--loss dpo: {len(examples)} preference pairs, beta {args.beta_dpo:g}"
    elif has_weights:
        note = f"weights from column '{args.weight_column}' (sum {sum(e.weight for e in examples):.2f})"
    else:
        note = "--weight_column none: every sample has weight 1 (plain SFT)"
    return examples, note


def preprocess(image, resolution, center_crop, flip, crop_seed):
    """An example's image (path or PIL) -> pixels in [-1, 1], original (h, w), crop top-left (y, x) in the resized
    image, as SDXL's time ids need. A flip mirrors the crop: its left edge becomes width - left - resolution."""
    import random

    from PIL import Image, ImageOps
    from torchvision.transforms import functional as F

    image = Image.open(image) if isinstance(image, str) else image
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


def flip_of(args, epoch, index):
    import random

    return args.random_flip and random.Random(cu.derive(args.seed, "flip", epoch, index)).random() < 0.5


class ImageDataset:
    """Index -> what a training sample needs: caption, weight, flip, and the pixels unless latents are cached (with
    --loss dpo the rejected image's too, `rejected_*`, cropped and flipped alike). Flips are drawn per epoch: the
    trainer sets `epoch` before each one."""

    def __init__(self, examples, args, cached):
        self.examples, self.args, self.cached, self.epoch = examples, args, cached, 0

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        example = self.examples[index]
        flip = flip_of(self.args, self.epoch, index)
        item = {"index": index, "flip": flip, "caption": example.caption, "weight": example.weight}
        if not self.cached:
            for prefix, image in (("", example.image), ("rejected_", example.rejected)):
                if image is not None:
                    pixels, original_size, crop = preprocess(image, self.args.resolution, self.args.center_crop, flip,
                                                             cu.derive(self.args.seed, "crop", index))
                    item.update({f"{prefix}pixels": pixels, f"{prefix}original_size": original_size,
                                 f"{prefix}crop_top_left": crop})
        return item


def collate(items):
    import torch

    batch = {key: [item[key] for item in items] for key in items[0]}
    batch["weight"] = torch.tensor(batch["weight"], dtype=torch.float32)
    for key in ("pixels", "rejected_pixels"):
        if key in batch:
            batch[key] = torch.stack(batch[key])
    return batch


class EpochPermutation:
    """A seeded shuffle per epoch (the dataset's `epoch`), so a resumed run sees the same order."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(cu.derive(self.seed, "order", self.dataset.epoch))
        return iter(torch.randperm(len(self.dataset), generator=generator).tolist())


def make_dataloader(examples, args, cached):
    """-> (dataset, dataloader): seeded order and flips per epoch (set `dataset.epoch`), pixels only if not cached."""
    import torch

    dataset = ImageDataset(examples, args, cached)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size,
                                             sampler=EpochPermutation(dataset, args.seed), collate_fn=collate,
                                             num_workers=args.dataloader_num_workers)
    return dataset, dataloader


class SampleRandom:
    """A batch's random draws, each sample's from its own seed (--seed, epoch, sample index), on the CPU: a run is
    the same whatever the batch split, the number of processes, or the step it was resumed at."""

    def __init__(self, seed, epoch, indices):
        import torch

        self.generators = [torch.Generator().manual_seed(cu.derive(seed, "sample", epoch, i)) for i in indices]

    def rand(self, *shape):
        import torch

        return torch.stack([torch.rand(shape, generator=g) for g in self.generators])

    def randn(self, *shape):
        import torch

        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])

    def randint(self, high):
        import torch

        return torch.stack([torch.randint(0, high, (), generator=g) for g in self.generators])


def drop_captions(captions, proportion, random):
    """Caption dropout (--proportion_empty_prompts): each caption becomes "" with that probability, so the
    unconditional prediction that classifier-free guidance uses keeps training."""
    drop = random.rand() < proportion
    return ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]


# ----------------------------------------------------------------------------------------------------------------
# The one-time cache: CRAFT's sets are ~100 images, so every latent and caption embedding is computed once


def should_cache(args, examples):
    return args.cache_latents == "yes" or (args.cache_latents == "auto" and len(examples) <= AUTO_CACHE_LIMIT)


class Encodings:
    """The training set's VAE posteriors (per image, flip, and preferred or rejected image of a pair) and caption
    embeddings: encoded once and kept (`cache`), or encoded for each batch. The encode functions are the script's:
    `encode_images(pixels) -> (mean, std)`, `encode_captions(captions) -> {name: tensor, batch first}`;
    without `encode_captions` the script encodes the captions itself (its text encoders train)."""

    def __init__(self, examples, args, encode_images, encode_captions, cache, show_progress=True):
        import torch
        from tqdm.auto import tqdm

        self.encode_images, self.encode_captions, self.cache = encode_images, encode_captions, cache
        self.latents, self.texts = {}, {}
        if not cache:
            return
        flips = (False, True) if args.random_flip else (False,)
        kinds = (False, True) if examples[0].rejected is not None else (False,)
        keys = [(i, flip, rejected) for i in range(len(examples)) for flip in flips for rejected in kinds]
        for start in tqdm(range(0, len(keys), args.train_batch_size), desc="caching latents",
                          disable=not show_progress):
            chunk = keys[start: start + args.train_batch_size]
            prepared = [preprocess(examples[i].rejected if rejected else examples[i].image, args.resolution,
                                   args.center_crop, flip, cu.derive(args.seed, "crop", i))
                        for i, flip, rejected in chunk]
            with torch.no_grad():
                mean, std = encode_images(torch.stack([p[0] for p in prepared]))
            for j, key in enumerate(chunk):
                self.latents[key] = (mean[j], std[j], prepared[j][1], prepared[j][2])
        if encode_captions is None:
            return
        captions = sorted({e.caption for e in examples} | {""})
        for start in range(0, len(captions), args.train_batch_size):
            chunk = captions[start: start + args.train_batch_size]
            with torch.no_grad():
                encoded = encode_captions(chunk)
            for j, caption in enumerate(chunk):
                self.texts[caption] = {name: value[j] for name, value in encoded.items()}

    def latent_dist(self, batch, rejected=False):
        """-> posterior mean, std (batch first) and sizes: original (h, w) and crop top-left (y, x) per sample; of
        each pair's rejected image with `rejected`."""
        import torch

        if not self.cache:
            prefix = "rejected_" if rejected else ""
            with torch.no_grad():
                mean, std = self.encode_images(batch[f"{prefix}pixels"])
            return mean, std, {"original_size": batch[f"{prefix}original_size"],
                               "crop_top_left": batch[f"{prefix}crop_top_left"]}
        parts = [self.latents[(i, flip, rejected)] for i, flip in zip(batch["index"], batch["flip"])]
        sizes = {"original_size": [p[2] for p in parts], "crop_top_left": [p[3] for p in parts]}
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), sizes

    def text(self, captions):
        """-> the frozen encoders' conditioning of these captions, from the cache or encoded now."""
        import torch

        if self.texts:
            return {name: torch.stack([self.texts[c][name] for c in captions]) for name in self.texts[""]}
        with torch.no_grad():
            return self.encode_captions(captions)


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the loss and the run


def stop_if_diverged(loss, step, args):
    """A loss that is not finite leaves every trained weight NaN from then on: stop before that is saved as a
    result (the checkpoints saved before stay whole)."""
    if not math.isfinite(loss):
        cu.fail(f"the loss is {loss} at step {step}: training diverged (--learning_rate {args.learning_rate:g}); lower "
                "--learning_rate or clip the gradients with --max_grad_norm, then train anew with "
                "--overwrite_output_dir or resume from a checkpoint-N saved before that step")


def per_sample_mse(model_pred, target):
    """|| pred_i - target_i ||^2 / (elements per sample), in fp32: one value per sample, for the CRAFT weights."""
    return ((model_pred.float() - target.float()) ** 2).mean(dim=list(range(1, model_pred.dim())))


def diffusion_dpo_loss(errors, reference_errors, beta):
    """Diffusion-DPO (Wallace et al., 2023) from per-sample errors, the batch's preferred images (w) first and their
    rejected ones (l) after, of the model and of the reference: L = mean -log sigmoid(-beta/2 * ((e_w - e_l) -
    (e_ref_w - e_ref_l))). -> (L, each pair's term inside the sigmoid: > 0 where the model prefers w more than the
    reference does, the implicit accuracy)."""
    import torch

    model_w, model_l = errors.chunk(2)
    reference_w, reference_l = reference_errors.chunk(2)
    inside = -0.5 * beta * ((model_w - model_l) - (reference_w - reference_l))
    return -torch.nn.functional.logsigmoid(inside).mean(), inside


@contextlib.contextmanager
def adapters_disabled(*models):
    """The base model inside models that train LoRAs (a no-op for models without): Diffusion-DPO's reference."""
    from diffusers.utils.peft_utils import set_adapter_layers

    for model in models:
        set_adapter_layers(model, enabled=False)
    try:
        yield
    finally:
        for model in models:
            set_adapter_layers(model, enabled=True)


def min_snr_weights(noise_scheduler, timesteps, snr_gamma):
    """Min-SNR-gamma (Hang et al., 2023) as diffusers' examples apply it: min(SNR, gamma) / SNR for epsilon
    targets, / (SNR + 1) for v-prediction."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    return weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)


def make_accelerator(args, find_unused_parameters=False):
    """find_unused_parameters: some trained weights get no gradient (e.g. the LoRA of a text encoder's last layer
    when the model reads its penultimate hidden states), which DDP must be told of."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)])
    if args.allow_tf32:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def weight_dtype_of(accelerator):
    import torch

    # from the accelerator, not the flag: `accelerate config` may set it (the "unscale FP16 gradients" trap)
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(params, args, num_processes):
    """AdamW, or bitsandbytes' AdamW8bit (--use_8bit_adam: a quarter of the optimizer state's memory)."""
    import torch

    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * num_processes
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


class StepInBackward:
    """Adam inside backward: buckets of weights (<= 32 tensors, 16M values), each with its own optimizer, stepped by
    a hook once backward has made the whole bucket's gradients, which are then freed: no full gradient buffer, and
    the optimizer's per-call cost paid per bucket. Adam treats each weight alone, so this equals one optimizer over
    all, step for step. `lead` is what the lr scheduler drives and accelerate prepares; its step() steps a bucket
    that a weight without gradient left waiting. Hand it to co.register_checkpoint_hooks (it holds Adam's state)."""

    def __init__(self, params, args, num_processes, bucket_tensors=32, bucket_values=2 ** 24):
        import torch

        buckets = [[]]
        for param in params:
            values = sum(p.numel() for p in buckets[-1]) + param.numel()
            if len(buckets[-1]) == bucket_tensors or values > bucket_values:
                buckets.append([])
            buckets[-1].append(param)
        buckets = [bucket for bucket in buckets if bucket]
        self.optimizers = [make_optimizer(bucket, args, num_processes) for bucket in buckets]
        self.waiting = [len(bucket) for bucket in buckets]
        for index, bucket in enumerate(buckets):
            for param in bucket:
                param.register_post_accumulate_grad_hook(lambda _, index=index: self.arrived(index))
        stepper = self

        class Lead(torch.optim.Optimizer):
            def step(self, closure=None):
                for index, waiting in enumerate(stepper.waiting):
                    if waiting < len(stepper.optimizers[index].param_groups[0]["params"]):
                        stepper.step(index)

        self.lead = Lead([torch.nn.Parameter(torch.zeros(1))], {"lr": self.optimizers[0].defaults["lr"]})

    def arrived(self, index):
        self.waiting[index] -= 1
        if not self.waiting[index]:
            self.step(index)

    def step(self, index):
        optimizer = self.optimizers[index]
        optimizer.param_groups[0]["lr"] = self.lead.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.waiting[index] = len(optimizer.param_groups[0]["params"])

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
