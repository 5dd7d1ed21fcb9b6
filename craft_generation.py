"""Loading any diffusers text-to-image pipeline and generating images with it, resumable and sharded across
processes: shared by generate_candidates.py, eval_rewards.py's model mode and the benchmarks. Nothing here knows a
model family: what differs between families is read from the pipeline (model_index.json's classes, its __call__
parameters and their defaults, its denoiser's and VAE's configs)."""

import contextlib
import glob
import hashlib
import inspect
import os
import shutil
import time

from types import SimpleNamespace

import craft_utils as cu

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}
# speed options that may change an image's pixels: recorded (when on) with the settings, so that a folder is never
# resumed under other numerics; offloading moves weights, not arithmetic, and is not recorded
NUMERICS_OPTIONS = ["compile", "fuse_qkv_projections", "channels_last", "sdpa_backend", "vae_slicing", "vae_tiling"]

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def add_generation_args(parser, model_required=True):
    group = parser.add_argument_group("model and sampling")
    group.add_argument("--pretrained_model_name_or_path", required=model_required,
                       help="any diffusers text-to-image pipeline (SD1.5, SDXL, FLUX, Z-Image, FLUX.2 [klein], SD3, "
                            "...): Hub id or local folder")
    group.add_argument("--revision", help="model revision (branch, tag or commit) on the Hub")
    group.add_argument("--variant", help="weights variant to load, e.g. fp16")
    group.add_argument("--pretrained_vae_model_name_or_path",
                       help="a VAE to use instead of the pipeline's (e.g. madebyollin/sdxl-vae-fp16-fix)")
    group.add_argument("--lora_path", help="LoRA weights to load into the pipeline (a folder or a .safetensors file)")
    group.add_argument("--scheduler", choices=sorted(SCHEDULERS),
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
    speed.add_argument("--channels_last", action="store_true", help="channels-last memory format for the UNet and VAE")
    speed.add_argument("--sdpa_backend", choices=sorted(SDPA_BACKENDS),
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
        old = cu.previous_generation(output_dir)
        if os.path.exists(old) and cu.generation_complete(output_dir):  # a kill came as it was being deleted
            shutil.rmtree(old)
        if start_over:  # the old images stay, aside, until the new run completes
            if os.path.exists(old):  # an earlier --overwrite never completed: the folder holds only its partial run
                shutil.rmtree(output_dir)
                if cu.recorded_settings(old) == settings:  # the settings of the run set aside: it comes back
                    os.replace(old, output_dir)
                    print(f"{output_dir}: restored the finished run that an interrupted --overwrite had set aside")
            else:
                os.replace(output_dir, old)
            if os.path.exists(old):
                print(f"{output_dir}: the previous images are kept in {old} until this run completes")
        os.makedirs(output_dir, exist_ok=True)
        cu.claim_folder(output_dir)  # held until this run ends: a second run into it stops in one line
        size = native_size(pipe)
        cu.write_json_atomic(os.path.join(output_dir, cu.GENERATION_CONFIG), {
            "settings": settings,
            "resolved": {"pipeline_class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                         "height": args.height or size, "width": args.width or size},
            "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
        })
    state.wait_for_everyone()


def read_pipeline(path, revision):
    """What the pack reads of a pipeline before loading its weights, from its model_index.json and the diffusers
    classes that names: `name` (the pipeline class), `components` (name -> class name), `denoiser` ("unet" or
    "transformer") and `call` (its __call__'s parameters -> defaults). A pipeline the pack cannot drive is refused
    here, in one line."""
    import diffusers
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except (OSError, ValueError) as error:
        cu.fail(f"could not read a diffusers pipeline from '{path}' ({str(error).splitlines()[0]}); give a local "
                "pipeline folder with model_index.json or a Hub id")
    cu.check_pipeline_folder(path, index)
    name = index.get("_class_name")
    if not isinstance(name, str):  # a custom pipeline names [module, class]
        cu.fail(f"{path}/model_index.json names {name!r}, not one of diffusers' pipeline classes; the pack loads "
                "diffusers' own text-to-image pipelines")
    pipeline_class = getattr(diffusers, name, None)
    if pipeline_class is None:
        cu.fail(f"{path} is a {name}, which diffusers {diffusers.__version__} does not have; upgrade diffusers or "
                "give a diffusers text-to-image pipeline")
    components = {key: value[1] for key, value in index.items()
                  if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1]}
    call = {key: parameter.default for key, parameter in inspect.signature(pipeline_class.__call__).parameters.items()}
    denoiser = next((key for key in ("unet", "transformer") if key in components), None)
    text_to_image = {cls.__name__ for cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values()}
    taken = {"prompt", "height", "width", "num_inference_steps", "generator", "output_type"}
    needs_an_image = "controlnet" in components or {"control_image", "mask_image"} & set(call)
    if name not in text_to_image or not denoiser or "vae" not in components or needs_an_image or taken - set(call):
        cu.fail(f"{path} is a {name}, which the pack cannot drive: it generates from prompts alone with diffusers' "
                "text-to-image pipelines (AutoPipelineForText2Image's, without a control or mask image) that have a "
                "VAE and a UNet or transformer; give such a pipeline (StableDiffusionXLPipeline, FluxPipeline, "
                "ZImagePipeline, ...)")
    return SimpleNamespace(name=name, pipeline_class=pipeline_class, components=components, denoiser=denoiser,
                           call=call)


def resolve_sampling_settings(args):
    """Before any folder is written: refuse, in one line, each flag the pipeline cannot take, and resolve
    --guidance_scale to the pipeline's own __call__ default when it is not given. A folder made at another guidance
    is refused with the way to resume it: it is never resumed under another default."""
    import diffusers

    pipeline = read_pipeline(args.pretrained_model_name_or_path, args.revision)
    name = pipeline.name
    for flag in ("guidance_scale", "max_sequence_length"):
        if getattr(args, flag) is not None and flag not in pipeline.call:
            cu.fail(f"--{flag}: {name} has no {flag} to set; leave the flag out")
    if args.scheduler:
        own = pipeline.components.get("scheduler")
        if SCHEDULERS[args.scheduler] not in {own, *getattr(getattr(diffusers, own or "", None), "_compatibles", [])}:
            cu.fail(f"--scheduler {args.scheduler}: {name} samples with its {own}, which "
                    f"{SCHEDULERS[args.scheduler]} cannot replace; leave --scheduler out")
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
    multiple = size_multiple(args, pipeline)
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and multiple and value % multiple:
            cu.fail(f"--{flag} {value} must be a multiple of {multiple} for {name} (its VAE's scale"
                    f"{' x 2x2 patches' if pipeline.denoiser == 'transformer' else ''}); try "
                    f"{max(value // multiple, 1) * multiple}")
    if args.guidance_scale is None and "guidance_scale" in pipeline.call:
        args.guidance_scale = default = pipeline.call["guidance_scale"]
        if not args.overwrite and os.path.isfile(os.path.join(args.output_dir, cu.GENERATION_CONFIG)):
            recorded = cu.recorded_settings(args.output_dir).get("guidance_scale")
            if recorded is not None and recorded != default:
                cu.fail(f"{args.output_dir} was made at guidance_scale {recorded:g} and {name}'s own default is "
                        f"{default!r}: pass --guidance_scale {recorded:g} to resume it, or --overwrite to start over "
                        "at the default")
    return pipeline


def size_multiple(args, pipeline):
    """What image sides must be a multiple of: the VAE's downscaling (2 per level of its encoder), times 2 for a
    transformer's 2x2 patches, and at least 8 for a UNet (diffusers' SD pipelines check 8 whatever their VAE); None
    where the VAE's config does not say."""
    import diffusers

    vae = args.pretrained_vae_model_name_or_path
    try:
        config = diffusers.AutoModel.load_config(vae or args.pretrained_model_name_or_path,
                                                 **({} if vae else {"subfolder": "vae", "revision": args.revision}))
    except (OSError, ValueError):
        return None
    levels = len(config.get("block_out_channels") or [])
    if not levels:
        return None
    return 2 ** (levels - 1) * 2 if pipeline.denoiser == "transformer" else max(2 ** (levels - 1), 8)


def load_pipeline(args, device):
    import torch
    from diffusers import AutoModel, DiffusionPipeline
    import diffusers

    dtype = getattr(torch, cu.TORCH_DTYPES[args.mixed_precision])
    common = {"revision": args.revision, "variant": args.variant, "dtype": dtype}
    try:
        extra = {}
        if args.pretrained_vae_model_name_or_path:  # of the class its config names, as the pipeline's own VAE
            extra["vae"] = AutoModel.from_pretrained(args.pretrained_vae_model_name_or_path, dtype=dtype)
        pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **common, **extra)
    except (OSError, ValueError) as error:
        cu.fail(f"could not load a diffusers pipeline from '{args.pretrained_model_name_or_path}' "
                f"({str(error).splitlines()[0]}); give a local pipeline folder with model_index.json or a Hub id")
    if args.lora_path:
        if not os.path.exists(args.lora_path):
            cu.fail(f"--lora_path {args.lora_path} does not exist")
        folder, weight_name = (args.lora_path, None) if os.path.isdir(args.lora_path) else os.path.split(args.lora_path)
        try:
            pipe.load_lora_weights(folder, weight_name=weight_name)
        except (OSError, ValueError, KeyError, RuntimeError) as error:  # RuntimeError: shapes of another family
            cu.fail(f"--lora_path {args.lora_path}: {type(pipe).__name__} cannot load it as a LoRA "
                    f"({str(error).splitlines()[0][:200]}); give a LoRA file of this model's family")
    if args.scheduler:
        scheduler_class = getattr(diffusers, SCHEDULERS[args.scheduler])
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return speed_up(pipe, args, device)


def attention_kernel(args):
    """The context that holds torch's scaled-dot-product attention to --sdpa_backend (none: torch's choice)."""
    import torch

    if not args.sdpa_backend:
        return contextlib.nullcontext()
    return torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, SDPA_BACKENDS[args.sdpa_backend]))


def speed_up(pipe, args, device):
    """The speed and memory options, applied to a loaded pipeline; returns it on `device` (or offloaded)."""
    import torch

    denoiser = denoiser_of(pipe)
    if args.sdpa_backend:  # a backend that cannot run here fails now, in one line, not at the first image
        probe = torch.zeros(1, 1, 8, 64, device=device, dtype=denoiser.dtype)
        try:
            with attention_kernel(args):
                torch.nn.functional.scaled_dot_product_attention(probe, probe, probe)
        except RuntimeError:
            cu.fail(f"--sdpa_backend {args.sdpa_backend} has no kernel for {device} in {denoiser.dtype}; choose "
                    "another or leave it out to let torch choose")
    if args.compile and args.enable_sequential_cpu_offload:
        cu.fail("--compile with --enable_sequential_cpu_offload would compile around weights that move layer by "
                "layer; use one of them")
    if args.fuse_qkv_projections:
        if args.lora_path:  # fusing replaces the LoRA'd projections: merge the LoRA (every component's) in first
            pipe.fuse_lora(components=pipe._lora_loadable_modules)
            pipe.unload_lora_weights()
        denoiser.fuse_qkv_projections()
    if args.channels_last:  # only 4-d weights change: a transformer without convolutions stays as it is
        for module in (denoiser, pipe.vae):
            module.to(memory_format=torch.channels_last)
    for flag, enable in (("vae_slicing", "enable_slicing"), ("vae_tiling", "enable_tiling")):
        if getattr(args, flag):
            try:
                getattr(pipe.vae, enable)()
            except (AttributeError, NotImplementedError):
                cu.fail(f"--{flag}: {type(pipe).__name__}'s {type(pipe.vae).__name__} does not support it; leave "
                        "the flag out")
    if args.compile:
        denoiser.compile()
        pipe.vae.decoder.compile()
    if args.enable_model_cpu_offload or args.enable_sequential_cpu_offload:
        if torch.device(device).type == "cpu":
            cu.fail("--enable_model_cpu_offload / --enable_sequential_cpu_offload move weights between the CPU and a "
                    "GPU; there is no GPU here: leave them out")
        if args.enable_sequential_cpu_offload:
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def denoiser_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def native_size(pipe):
    """The pipeline's own image size in pixels: its default latent size (FLUX, SD3...) or its denoiser's configured
    one (a UNet's), times the VAE's downscaling; else its __call__'s default height; None where the pipeline
    settles it inside its call (Z-Image)."""
    latent_size = getattr(pipe, "default_sample_size", None) or denoiser_of(pipe).config.get("sample_size")
    if isinstance(latent_size, int) and hasattr(pipe, "vae_scale_factor"):
        return latent_size * pipe.vae_scale_factor
    height = inspect.signature(type(pipe).__call__).parameters["height"].default
    return height if isinstance(height, int) else None


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
    size = native_size(pipe)
    # what this pipeline takes (resolve_sampling_settings refused the rest); unset values stay the pipeline's own
    sampling = {"num_inference_steps": args.num_inference_steps, "output_type": "pil", **{
        key: value for key, value in (("guidance_scale", args.guidance_scale), ("height", args.height or size),
                                      ("width", args.width or size), ("max_sequence_length", args.max_sequence_length))
        if value is not None}}
    started = time.time()
    attention = attention_kernel(args)
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
                             sort_key=cu.image_sort_key)
        shutil.rmtree(cu.previous_generation(output_dir), ignore_errors=True)  # replaced (--overwrite), now for good
    state.wait_for_everyone()
    return todo, time.time() - started
