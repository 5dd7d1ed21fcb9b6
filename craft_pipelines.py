"""Any diffusers text-to-image pipeline, read and loaded: what the pack reads of it before its weights load (its
classes, its __call__'s parameters and defaults, the sizes its VAE and denoiser take), loading it with a VAE or LoRA
swapped in, and the speed and memory options. Nothing here knows a model family: what differs is read from the
pipeline. Shared by generation, evaluation and the benchmarks."""

import contextlib
import inspect
import os
from types import SimpleNamespace

import craft_utils as cu

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def read_model_index(path, revision=None, flag="--pretrained_model_name_or_path"):
    """The model_index.json of a pipeline given as a local folder or a Hub id; None for a local folder without one
    (a model the script loads part by part). One that cannot be had is refused in one line saying why (no such
    folder; offline and not in the cache; no such model; gated) and what to do."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{flag} {path}"
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            return None
    elif os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        cu.fail(f"{where}: no such folder, and not a Hub id (owner/name); give a pipeline folder or a Hub id")
    else:
        try:
            hf_hub_download(path, "model_index.json", revision=revision)
        except GatedRepoError:
            cu.fail(f"{where} is gated: accept its licence on https://huggingface.co/{path}, then log in with "
                    "`hf auth login` (or set HF_TOKEN)")
        except RepositoryNotFoundError:
            cu.fail(f"{where}: no such model on the Hub (or a private one: log in with `hf auth login`); check the id")
        except RevisionNotFoundError:
            cu.fail(f"{where}: no revision {revision!r} on the Hub; check --revision")
        except RemoteEntryNotFoundError:
            cu.fail(f"{where} has no model_index.json on the Hub: it is not a diffusers pipeline")
        except LocalEntryNotFoundError:
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            cu.fail(f"{where} is not a local folder, the Hub cannot be reached ("
                    f"{'HF_HUB_OFFLINE is set' if offline else 'no network'}) and it is not in the cache: download "
                    f"it where there is a network (`hf download {path}`), or give a local pipeline folder")
    try:
        return DiffusionPipeline.load_config(path, revision=revision)
    except (OSError, ValueError) as error:
        cu.fail(f"{where}: its model_index.json cannot be read ({str(error).splitlines()[0]}); give a diffusers "
                "pipeline folder or Hub id")


def read_pipeline(path, revision):
    """What the pack reads of a pipeline before loading its weights, from its model_index.json and the diffusers
    classes that names: `name` (the pipeline class), `components` (name -> class name), `denoiser` ("unet" or
    "transformer") and `call` (its __call__'s parameters -> defaults). A pipeline the pack cannot drive is refused
    here, in one line."""
    import diffusers
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    index = read_model_index(path, revision)
    if index is None:
        cu.fail(f"{path} has no model_index.json; give a diffusers pipeline folder or Hub id")
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
