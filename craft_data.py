"""The CRAFT trainers' training set: an imagefolder (or a Hub dataset) with per-sample weights, checked whole before
any model loads; per-sample preprocessing and seeds, so that any process count and any resume draw the same; and the
one-time cache of latents and caption embeddings, given the script's encode functions."""

import math
import os
from dataclasses import dataclass

import craft_utils as cu

AUTO_CACHE_LIMIT = 2000  # --cache_latents auto caches sets of up to this many images


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
    rejected_column = args.rejected_image_column if folder is None else "rejected_file_name"
    is_pairs = all(rejected_column in row for row in rows)
    if folder is not None:  # a pairs set may prefer one image in two pairs, not hold one pair twice
        cu.refuse_repeated_rows(rows, source, ("file_name", rejected_column) if is_pairs else ("file_name",))
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


def drop_captions(captions, proportion, draws):
    """Caption dropout (--proportion_empty_prompts): each caption becomes "" with that probability, so the
    unconditional prediction that classifier-free guidance uses keeps training."""
    drop = draws.rand() < proportion
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
