"""Loading text-to-image pipelines (SD1.5, SDXL, FLUX.1) and generating images with them, resumable and sharded
across processes: shared by generate_candidates.py, eval_rewards.py's model mode and the benchmarks."""

import contextlib
import hashlib
import os
import shutil
import time

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
                       help="SD1.5-, SDXL- or FLUX.1-style diffusers pipeline: Hub id or local folder")
    group.add_argument("--revision", help="model revision (branch, tag or commit) on the Hub")
    group.add_argument("--variant", help="weights variant to load, e.g. fp16")
    group.add_argument("--pretrained_vae_model_name_or_path",
                       help="a VAE to use instead of the pipeline's (e.g. madebyollin/sdxl-vae-fp16-fix)")
    group.add_argument("--lora_path", help="LoRA weights to load into the pipeline (a folder or a .safetensors file)")
    group.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the pipeline's own)")
    group.add_argument("--num_inference_steps", type=int, default=30)
    group.add_argument("--guidance_scale", type=float,
                       help="classifier-free guidance (SD1.5/SDXL; default 7.5), or the guidance embedding's value "
                            "(FLUX.1-dev; default 3.5)")
    group.add_argument("--max_sequence_length", type=int, help="FLUX: T5 tokens per prompt (the pipeline's 512)")
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


def generation_settings(args):
    """Every flag that changes the images, and the local model's configs; a folder is only resumed with the same."""
    names = ["pretrained_model_name_or_path", "revision", "variant", "pretrained_vae_model_name_or_path",
             "lora_path", "scheduler", "num_inference_steps", "guidance_scale", "height", "width",
             "num_images_per_prompt", "batch_size", "mixed_precision", "seed", "max_sequence_length"]
    return {**{name: getattr(args, name) for name in names},
            **{name: getattr(args, name) for name in NUMERICS_OPTIONS if getattr(args, name)},
            "model_configs_sha256": local_model_configs_sha256(args.pretrained_model_name_or_path)}


def start_generation_folder(output_dir, settings, pipe, args, start_over, state):
    """Create the folder and record every setting (main process), before any image is made."""
    if state.is_main_process:
        import diffusers
        import torch

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
        size = native_size(pipe)
        cu.write_json_atomic(os.path.join(output_dir, cu.GENERATION_CONFIG), {
            "settings": settings,
            "resolved": {"pipeline_class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                         "height": args.height or size, "width": args.width or size},
            "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
        })
    state.wait_for_everyone()


def pipeline_class_name(path, revision):
    """The pipeline class a model_index.json names (local folder or Hub id); None if there is none to read."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path, revision=revision).get("_class_name")
    except Exception:  # not a pipeline folder, or not reachable: loading the model says why
        return None


def resolve_sampling_defaults(args):
    """The defaults that depend on the model family, resolved before the settings are recorded: --guidance_scale is
    classifier-free guidance for SD1.5/SDXL (7.5) and the guidance embedding's value for FLUX.1-dev (3.5)."""
    is_flux = "Flux" in (pipeline_class_name(args.pretrained_model_name_or_path, args.revision) or "")
    if args.guidance_scale is None:
        args.guidance_scale = 3.5 if is_flux else 7.5
    if args.max_sequence_length is not None and not is_flux:
        cu.fail("--max_sequence_length is for FLUX pipelines (the T5 encoder's tokens); leave it out for SD1.5/SDXL")
    if args.scheduler and is_flux:
        cu.fail("--scheduler picks an SD1.5/SDXL sampler; FLUX samples with its own flow-matching Euler scheduler")


def load_pipeline(args, device):
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline
    import diffusers

    dtype = getattr(torch, cu.TORCH_DTYPES[args.mixed_precision])
    common = {"revision": args.revision, "variant": args.variant, "dtype": dtype}
    try:
        extra = {}
        if args.pretrained_vae_model_name_or_path:
            extra["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, dtype=dtype)
        pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **common, **extra)
    except (OSError, ValueError, EnvironmentError) as error:
        cu.fail(f"could not load a diffusers pipeline from '{args.pretrained_model_name_or_path}' "
                f"({str(error).splitlines()[0]}); give a local pipeline folder with model_index.json or a Hub id")
    if not (hasattr(pipe, "unet") or hasattr(pipe, "transformer")) or not hasattr(pipe, "vae"):
        cu.fail(f"{args.pretrained_model_name_or_path} is a {type(pipe).__name__}, not an SD1.5/SDXL/FLUX-style "
                "pipeline")
    if args.lora_path:
        if not os.path.exists(args.lora_path):
            cu.fail(f"--lora_path {args.lora_path} does not exist")
        folder, weight_name = (args.lora_path, None) if os.path.isdir(args.lora_path) else os.path.split(args.lora_path)
        pipe.load_lora_weights(folder, weight_name=weight_name)
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

    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
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
    if args.channels_last:
        for module in (denoiser, pipe.vae) if hasattr(pipe, "unet") else (pipe.vae,):  # FLUX's transformer: no convs
            module.to(memory_format=torch.channels_last)
    if args.vae_slicing:
        pipe.vae.enable_slicing()
    if args.vae_tiling:
        pipe.vae.enable_tiling()
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


def native_size(pipe):
    """A UNet's sample size, or (FLUX) the pipeline's default, in pixels."""
    latent_size = pipe.unet.config.sample_size if hasattr(pipe, "unet") else pipe.default_sample_size
    return latent_size * pipe.vae_scale_factor


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
    started = time.time()
    attention = attention_kernel(args)
    with tqdm(total=todo, unit="img", desc="generating", disable=not state.is_local_main_process) as progress, \
            attention:
        for batch in mine:
            # compiled: a short last batch is padded with copies of its last image, so no shape is new
            calls = batch + batch[-1:] * (args.batch_size - len(batch)) if args.compile else batch
            images = pipe(
                prompt=[row["text"] for row in calls],
                generator=[torch.Generator("cpu").manual_seed(row["seed"]) for row in calls],
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                height=args.height or size, width=args.width or size, output_type="pil",
                **({"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}),
            ).images
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
