"""Generating images with any diffusers text-to-image pipeline (craft_pipelines.py loads it), resumable and sharded
across processes, and the generation folder's contract: its prompts, the settings it was made with (a folder is only
resumed under the same), image names and seeds, --overwrite. Shared by generate_candidates.py, eval_rewards.py's
model mode and the benchmarks; nothing here knows a model family."""

import csv
import glob
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import time

import craft_pipelines as cp
import craft_utils as cu

# speed options that may change an image's pixels: recorded (when on) with the settings, so that a folder is never
# resumed under other numerics; offloading moves weights, not arithmetic, and is not recorded
NUMERICS_OPTIONS = ["compile", "fuse_qkv_projections", "channels_last", "sdpa_backend", "vae_slicing", "vae_tiling"]


def add_generation_args(parser, model_required=True, default_model=None):
    group = parser.add_argument_group("model and sampling")
    group.add_argument("--pretrained_model_name_or_path", required=model_required and not default_model,
                       default=default_model,
                       help="any diffusers text-to-image pipeline (SD1.5, SDXL, FLUX, Z-Image, FLUX.2 [klein], SD3, "
                            "...): Hub id or local folder" + (f" (default: {default_model})" if default_model else ""))
    group.add_argument("--revision", help="model revision (branch, tag or commit) on the Hub")
    group.add_argument("--variant", help="weights variant to load, e.g. fp16")
    group.add_argument("--pretrained_vae_model_name_or_path",
                       help="a VAE to use instead of the pipeline's (e.g. madebyollin/sdxl-vae-fp16-fix)")
    group.add_argument("--lora_path", help="LoRA weights to load into the pipeline (a folder or a .safetensors file)")
    group.add_argument("--scheduler", choices=sorted(cp.SCHEDULERS),
                       help="sampler, for pipelines whose scheduler these replace (the DDPM-family ones of SD1.5, "
                            "SDXL...); default: the pipeline's own")
    group.add_argument("--num_inference_steps", type=int, default=30)
    group.add_argument("--guidance_scale", type=float,
                       help="the pipeline's guidance_scale: classifier-free guidance, or a guidance-distilled model's "
                            "guidance input (default: the pipeline's own, e.g. 7.5 SD1.5, 5.0 SDXL, 3.5 FLUX.1)")
    group.add_argument("--max_sequence_length", type=int,
                       help="text tokens per prompt, for pipelines that take it (FLUX, SD3, Z-Image...; default: the "
                            "pipeline's own)")
    group.add_argument("--height", type=int, help="image height (default: the model's native size)")
    group.add_argument("--width", type=int, help="image width (default: the model's native size)")
    group.add_argument("--num_images_per_prompt", type=int, default=2, help="images (seeds) per prompt text")
    group.add_argument("--batch_size", type=int, default=4, help="images per pipeline call, across prompts")
    group.add_argument("--mixed_precision", choices=sorted(cu.TORCH_DTYPES), default="no",
                       help="weights dtype for generation (fp16/bf16 on GPUs)")
    group.add_argument("--seed", type=int, default=0, help="base seed; each image's seed derives from it")
    speed = parser.add_argument_group("speed and memory (benchmarks/bench_generation.py measures each)")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the denoiser and the VAE decoder: compiled in the first batch, and the last "
                            "batch is padded to full size so nothing compiles again")
    speed.add_argument("--fuse_qkv_projections", action="store_true",
                       help="one matmul for the denoiser's q, k and v (a --lora_path LoRA is merged in first); keeps "
                            "the separate projections too, so it costs memory")
    speed.add_argument("--channels_last", action="store_true",
                       help="channels-last memory format for the UNet and the VAE (a transformer has no convolutions: "
                            "only its VAE changes)")
    speed.add_argument("--sdpa_backend", choices=sorted(cp.SDPA_BACKENDS),
                       help="the kernel torch's scaled-dot-product attention uses (default: torch's choice)")
    speed.add_argument("--enable_model_cpu_offload", action="store_true",
                       help="keep only the model that runs on the GPU (SDXL on 8-12 GB cards)")
    speed.add_argument("--enable_sequential_cpu_offload", action="store_true",
                       help="stream the weights to the GPU layer by layer: the least memory, the slowest")
    speed.add_argument("--vae_slicing", action="store_true", help="decode a batch one image at a time")
    speed.add_argument("--vae_tiling", action="store_true",
                       help="decode large images in overlapping tiles (lower decode peak; the seams are blended; "
                            "with --compile, edge tiles of other shapes compile again)")


def check_generation_args(args):
    """The sampling flags' values, refused in one line where they enter (a NaN guidance would draw black images)."""
    import math

    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        cu.fail(f"--guidance_scale must be a finite number (got {args.guidance_scale})")
    for flag in ("num_inference_steps", "max_sequence_length", "height", "width", "num_images_per_prompt",
                 "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            cu.fail(f"--{flag} must be at least 1 (got {getattr(args, flag)})")


def local_model_configs_sha256(path):
    """A local pipeline folder's JSON configs, hashed: a model retrained or replaced at the same path changes them
    (architecture, the VAE's fitted scaling factor). None for a Hub id, which --revision pins."""
    if not os.path.isdir(path):
        return None
    configs = {}
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith(".json"):
                with open(os.path.join(root, name), "rb") as f:
                    configs[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(f.read()).hexdigest()
    return cu.sha256_of(sorted(configs.items()))


def lora_sha256(path):
    """The LoRA's weights, hashed (a folder: its .safetensors files): a LoRA retrained at the same path never adds
    images to a folder made with the old one. None without a LoRA."""
    if not path or not os.path.exists(path):
        return None
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors"))) if os.path.isdir(path) else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(os.path.basename(file).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def generation_settings(args):
    """Every flag that changes the images, and the local model's configs; a folder is only resumed with the same."""
    names = ["pretrained_model_name_or_path", "revision", "variant", "pretrained_vae_model_name_or_path",
             "lora_path", "scheduler", "num_inference_steps", "guidance_scale", "height", "width",
             "num_images_per_prompt", "batch_size", "mixed_precision", "seed", "max_sequence_length"]
    return {**{name: getattr(args, name) for name in names},
            **{name: getattr(args, name) for name in NUMERICS_OPTIONS if getattr(args, name)},
            "model_configs_sha256": local_model_configs_sha256(args.pretrained_model_name_or_path),
            **({"lora_sha256": lora_sha256(args.lora_path)} if args.lora_path else {})}


def start_generation_folder(output_dir, settings, pipe, args, start_over, state):
    """Create and hold the folder, and record every setting (main process), before any image is made."""
    if state.is_main_process:
        import diffusers
        import torch

        if os.path.isdir(output_dir):  # before anything in it is touched
            cu.claim_folder(output_dir)
        old = previous_generation(output_dir)
        if os.path.exists(old) and generation_complete(output_dir):  # a kill came as it was being deleted
            shutil.rmtree(old)
        if start_over:  # the old images stay, aside, until the new run completes
            if os.path.exists(old):  # an earlier --overwrite never completed: the folder holds only its partial run
                shutil.rmtree(output_dir)
                if recorded_settings(old) == settings:  # the settings of the run set aside: it comes back
                    os.replace(old, output_dir)
                    print(f"{output_dir}: restored the finished run that an interrupted --overwrite had set aside")
            else:
                os.replace(output_dir, old)
            if os.path.exists(old):
                print(f"{output_dir}: the previous images are kept in {old} until this run completes")
        os.makedirs(output_dir, exist_ok=True)
        cu.claim_folder(output_dir)  # held until this run ends: a second run into it stops in one line
        size = cp.native_size(pipe)
        cu.write_json_atomic(os.path.join(output_dir, GENERATION_CONFIG), {
            "settings": settings,
            "resolved": {"pipeline_class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                         "height": args.height or size, "width": args.width or size},
            "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
        })
    state.wait_for_everyone()


def resolve_sampling_settings(args):
    """Before any folder is written: refuse, in one line, each flag the pipeline cannot take, and resolve
    --guidance_scale to the pipeline's own __call__ default when it is not given. A folder made at another guidance
    is refused with the way to resume it: it is never resumed under another default."""
    import diffusers

    pipeline = cp.read_pipeline(args.pretrained_model_name_or_path, args.revision)
    name = pipeline.name
    for flag in ("guidance_scale", "max_sequence_length"):
        if getattr(args, flag) is not None and flag not in pipeline.call:
            cu.fail(f"--{flag}: {name} has no {flag} to set; leave the flag out")
    if args.scheduler:
        own = pipeline.components.get("scheduler")
        if cp.SCHEDULERS[args.scheduler] not in {own, *getattr(getattr(diffusers, own or "", None), "_compatibles", [])}:
            cu.fail(f"--scheduler {args.scheduler}: {name} samples with its {own}, which "
                    f"{cp.SCHEDULERS[args.scheduler]} cannot replace; leave --scheduler out")
    if args.lora_path and not hasattr(pipeline.pipeline_class, "load_lora_weights"):
        cu.fail(f"--lora_path: {name} cannot load LoRA weights; leave the flag out")
    if args.fuse_qkv_projections and not hasattr(getattr(diffusers, pipeline.components[pipeline.denoiser], None),
                                                 "fuse_qkv_projections"):
        cu.fail(f"--fuse_qkv_projections: {name}'s {pipeline.components[pipeline.denoiser]} has no fused attention "
                "projections; leave the flag out")
    if args.pretrained_vae_model_name_or_path:  # the pipeline's own VAE class, or its call fails after the first batch
        try:
            vae_class = diffusers.AutoModel.load_config(args.pretrained_vae_model_name_or_path).get("_class_name")
        except (OSError, ValueError) as error:
            cu.fail(f"--pretrained_vae_model_name_or_path: could not read a model from "
                    f"'{args.pretrained_vae_model_name_or_path}' ({str(error).splitlines()[0]})")
        if vae_class != pipeline.components["vae"]:
            cu.fail(f"--pretrained_vae_model_name_or_path {args.pretrained_vae_model_name_or_path} is a {vae_class}; "
                    f"{name} takes a {pipeline.components['vae']}: give one of those")
    multiple = cp.size_multiple(args, pipeline)
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and multiple and value % multiple:
            cu.fail(f"--{flag} {value} must be a multiple of {multiple} for {name} (its VAE's scale"
                    f"{' x 2x2 patches' if pipeline.denoiser == 'transformer' else ''}); try "
                    f"{max(value // multiple, 1) * multiple}")
    if args.guidance_scale is None and "guidance_scale" in pipeline.call:
        args.guidance_scale = default = pipeline.call["guidance_scale"]
        if not args.overwrite and os.path.isfile(os.path.join(args.output_dir, GENERATION_CONFIG)):
            recorded = recorded_settings(args.output_dir).get("guidance_scale")
            if recorded is not None and recorded != default:
                cu.fail(f"{args.output_dir} was made at guidance_scale {recorded:g} and {name}'s own default is "
                        f"{default!r}: pass --guidance_scale {recorded:g} to resume it, or --overwrite to start over "
                        "at the default")
    return pipeline


def generate_images(pipe, planned, output_dir, args, state):
    """Make every planned image not yet on disk; returns how many this process made.

    Batches are fixed over the whole plan and dealt round-robin to processes, so every image comes out of the same
    batch (hence the same numerics) whatever the process count, and a resumed run redoes only unfinished batches.
    Images are written atomically and logged after they are on disk; the main process then folds the logs into
    metadata.jsonl, sorted.
    """
    import torch
    from tqdm.auto import tqdm

    if state.is_main_process:  # temp files of images a kill interrupted
        cu.remove_temp_files(output_dir)
    state.wait_for_everyone()
    done = {row["file_name"] for row in cu.read_logged_rows(output_dir, cu.METADATA, "images")
            if os.path.exists(os.path.join(output_dir, row["file_name"]))}
    batches = [planned[i: i + args.batch_size] for i in range(0, len(planned), args.batch_size)]
    mine = [batch for batch in batches[state.process_index:: state.num_processes]
            if any(row["file_name"] not in done for row in batch)]
    todo = sum(row["file_name"] not in done for batch in mine for row in batch)
    log = cu.AppendLog(os.path.join(output_dir, cu.PROGRESS_DIR, f"images-{state.process_index:05d}.jsonl"))
    size = cp.native_size(pipe)
    # what this pipeline takes (resolve_sampling_settings refused the rest); unset values stay the pipeline's own
    sampling = {"num_inference_steps": args.num_inference_steps, "output_type": "pil", **{
        key: value for key, value in (("guidance_scale", args.guidance_scale), ("height", args.height or size),
                                      ("width", args.width or size), ("max_sequence_length", args.max_sequence_length))
        if value is not None}}
    started = time.time()
    attention = cp.attention_kernel(args)
    with tqdm(total=todo, unit="img", desc="generating", disable=not state.is_local_main_process) as progress, \
            attention:
        for batch in mine:
            # compiled: a short last batch is padded with copies of its last image, so no shape is new
            calls = batch + batch[-1:] * (args.batch_size - len(batch)) if args.compile else batch
            images = pipe(prompt=[row["text"] for row in calls],
                          generator=[torch.Generator("cpu").manual_seed(row["seed"]) for row in calls],
                          **sampling).images
            new_rows = [row for row in batch if row["file_name"] not in done]
            for row, image in zip(batch, images):
                if row["file_name"] not in done:
                    cu.save_image_atomic(image, os.path.join(output_dir, row["file_name"]))
            cu.fault_point("images_written")
            log.append(new_rows)
            progress.update(len(new_rows))
    log.close()
    state.wait_for_everyone()
    if state.is_main_process:
        cu.merge_logged_rows(output_dir, cu.METADATA, "images", key=lambda r: r["file_name"],
                             sort_key=image_sort_key)
        shutil.rmtree(previous_generation(output_dir), ignore_errors=True)  # replaced (--overwrite), now for good
    state.wait_for_everyone()
    return todo, time.time() - started


# ----------------------------------------------------------------------------------------------------------------
# Prompts, and the generation folder: the settings it was made with, resume and --overwrite

GENERATION_CONFIG = "generation_config.json"


def add_prompt_args(parser):
    group = parser.add_argument_group("prompts")
    group.add_argument("--prompts_file",
                       help="a .txt (one prompt per line), .jsonl, .csv or .json file of prompts; a .json file is an "
                            "array of strings, or of objects holding --prompt_column (HPDv2's train.json as it is)")
    group.add_argument("--dataset_name", help="a Hugging Face dataset (Hub id or local folder) holding prompts")
    group.add_argument("--dataset_split", default="train", help="split of --dataset_name")
    group.add_argument("--prompt_column", default="prompt", help="column of the prompts in .jsonl/.csv/datasets")
    group.add_argument("--max_prompts", type=int, help="use at most this many prompts (after de-duplication)")
    group.add_argument(
        "--shuffle_prompts", action="store_true",
        help="shuffle the prompts with --seed before --max_prompts takes its subset",
    )
    group.add_argument("--skip_prompts", type=int, default=0,
                       help="leave out the first N prompts (after de-duplication and --shuffle_prompts): those an "
                            "earlier CRAFT round used, so the next round draws fresh ones with the same --seed")


def _column(rows, column, source):
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or column not in row:
            where = source if number == 1 else f"{source}, row {number}"
            columns = ", ".join(row) if isinstance(row, dict) else f"a {type(row).__name__}"
            cu.fail(f"{where} has no column '{column}' (columns: {columns}); set --prompt_column")
    return _text_values([row[column] for row in rows], source, "row")


def _text_values(values, source, unit):
    """The prompts as they are: text, or null for a row without one; anything else is refused, naming its row."""
    for number, value in enumerate(values, start=1):
        if value is not None and not isinstance(value, str):
            cu.fail(f"{source}, {unit} {number}: the prompt {value!r} is not text; fix that {unit}")
    return values


def _json_prompts(source, column):
    """A JSON array of prompt strings (HPSv2's benchmark files) or of records (HPDv2's train.json)."""
    try:
        data = json.loads(cu.read_text(source))
    except json.JSONDecodeError as error:
        cu.fail(f"{source}, line {error.lineno}: not valid JSON ({error.msg}); fix the file")
    if not isinstance(data, list):
        cu.fail(f"{source} holds a JSON {type(data).__name__}; a .json prompts file is an array of strings or of objects")
    if any(isinstance(item, str) for item in data):  # an array of strings
        return _text_values(data, source, "item")
    return _column(data, column, source)


def load_prompts(args):
    """Prompts from --prompts_file or --dataset_name: stripped, empty ones dropped, duplicates removed, in order."""
    if bool(args.prompts_file) == bool(args.dataset_name):
        cu.fail("give exactly one of --prompts_file and --dataset_name")
    if args.max_prompts is not None and args.max_prompts < 1:
        cu.fail(f"--max_prompts must be at least 1 (got {args.max_prompts}); leave it out to use every prompt")
    if args.skip_prompts < 0:
        cu.fail(f"--skip_prompts must be 0 or more (got {args.skip_prompts})")
    if args.prompts_file:
        source = args.prompts_file
        if not os.path.isfile(source):
            cu.fail(f"prompts file {source} does not exist")
        extension = os.path.splitext(source)[1].lower()
        if extension == ".jsonl":
            prompts = _column(cu.read_jsonl(source), args.prompt_column, source)
        elif extension == ".json":
            prompts = _json_prompts(source, args.prompt_column)
        elif extension == ".csv":
            prompts = _column(list(csv.DictReader(io.StringIO(cu.read_text(source)))), args.prompt_column, source)
        else:
            prompts = cu.read_text(source).splitlines()
    else:
        from datasets import load_dataset

        source = f"dataset {args.dataset_name} (split {args.dataset_split})"
        try:
            dataset = load_dataset(args.dataset_name, split=args.dataset_split)
        except Exception as error:  # datasets raises many types; the user needs the message, not the trace
            cu.fail(f"could not load {source}: {str(error).splitlines()[0]}")
        if args.prompt_column not in dataset.column_names:
            cu.fail(f"{source} has no column '{args.prompt_column}' (columns: {', '.join(dataset.column_names)}); "
                 "set --prompt_column")
        prompts = _text_values(dataset[args.prompt_column], source, "row")
    if None in prompts:
        print(f"{source}: left out {prompts.count(None)} row(s) without a prompt (null)", file=sys.stderr)
    prompts = list(dict.fromkeys(p.strip() for p in prompts if p is not None and p.strip()))
    if not prompts:
        cu.fail(f"{source} holds no prompts")
    if args.shuffle_prompts:
        random.Random(args.seed).shuffle(prompts)
    if args.skip_prompts >= len(prompts):
        cu.fail(f"{source} holds {len(prompts)} distinct prompts: --skip_prompts {args.skip_prompts} leaves none; "
                "give more prompts or fewer rounds")
    prompts = prompts[args.skip_prompts:]
    return prompts[: args.max_prompts] if args.max_prompts else prompts


# What the stages write into a generation folder: its images (image_file_name), records, rewards and their reports.
GENERATION_IMAGE = re.compile(r"\d{6}_v\d{2}_i\d{2}\.png$")


GENERATION_FILES = re.compile(rf"({GENERATION_IMAGE.pattern[:-1]}|generation_config\.json|metadata\.jsonl|"
                              r"expansions\.jsonl|rewards\.jsonl|rewards_summary\.(json|md)|rewards_hist\.png)$")


GENERATION_STAGE = {True: "generate_candidates.py", False: "eval_rewards.py"}  # by whether rewrites are recorded


def check_generation_folder(output_dir, settings, overwrite):
    """Refuse to mix settings in one folder, or to write into a folder that is not ours. True = start over."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        cu.fail(f"--output_dir {output_dir} is a file; give a folder")
    config_path = os.path.join(output_dir, GENERATION_CONFIG)
    if os.path.exists(config_path):
        previous = recorded_settings(output_dir)
        made_by, now = (GENERATION_STAGE["num_variants" in recorded] for recorded in (previous, settings))
        if made_by != now:
            cu.fail(f"{output_dir} was made by {made_by}; {now} writes only into its own folders: choose another "
                 "--output_dir")
        changed = [k for k in sorted(set(previous) | set(settings)) if previous.get(k) != settings.get(k)]
        if changed and not any(GENERATION_IMAGE.match(name) or name == "expansions.jsonl"
                               for name in os.listdir(output_dir)):  # nothing made yet: nothing to lose
            cu.refuse_foreign_entries(output_dir, GENERATION_FILES.match, "a run with new settings")
            print(f"{output_dir}: no image was made with its earlier settings; starting over with these")
            return True
        if changed and overwrite:
            cu.refuse_foreign_entries(output_dir, GENERATION_FILES.match, "--overwrite")
        if changed and not overwrite:
            first = changed[0]
            aside = previous_generation(output_dir)
            cu.fail(f"{output_dir} holds images made with other settings ({first}: {previous.get(first)!r} there, "
                 f"{settings.get(first)!r} now; {len(changed)} setting(s) differ); rerun with the same settings to "
                 "resume, choose another --output_dir, or pass --overwrite to start over"
                 + (f" (the run that one replaces is kept in {aside}; --overwrite with its settings brings it back)"
                    if os.path.exists(aside) else ""))
        return bool(changed)
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        cu.fail(f"{output_dir} is not empty and holds no {GENERATION_CONFIG}; choose an empty --output_dir")
    return False


def previous_generation(output_dir):
    """Where --overwrite keeps a folder's previous run until the new one completes."""
    return cu._swap_names(output_dir)[3]


def generation_complete(output_dir):
    """Every planned image made and logged: metadata.jsonl merged and no progress log left."""
    return os.path.isfile(os.path.join(output_dir, cu.METADATA)) and \
        not glob.glob(os.path.join(output_dir, cu.PROGRESS_DIR, "*.jsonl"))


def recorded_settings(output_dir):
    with open(os.path.join(output_dir, GENERATION_CONFIG), encoding="utf-8") as f:
        return json.load(f)["settings"]


def image_file_name(group_id, variant_id, image_index):
    return f"{group_id:06d}_v{variant_id:02d}_i{image_index:02d}.png"


def plan_images(groups, num_images_per_prompt, seed):
    """One metadata row per image to make. groups: [(original_prompt, [prompt texts, variant 0 first])]."""
    rows = []
    for group_id, (original_prompt, texts) in enumerate(groups):
        for variant_id, text in enumerate(texts):
            for image_index in range(num_images_per_prompt):
                rows.append({
                    "file_name": image_file_name(group_id, variant_id, image_index), "text": text,
                    "original_prompt": original_prompt, "group_id": group_id, "variant_id": variant_id,
                    "image_index": image_index, "seed": cu.derive_seed(seed, group_id, variant_id, image_index),
                })
    return rows


def image_sort_key(row):
    return row["group_id"], row["variant_id"], row["image_index"]
