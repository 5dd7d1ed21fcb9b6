"""What the CRAFT trainers share and a fork for another model family keeps: the flags (the diffusers surface +
CRAFT's) and their checks, the check that a model is of the script's family, the accelerator and optimizer, and the
small pieces of the weighted loss. The models, the loop, the noise and timestep draw, the target and the loss itself
are written in each trainer script; the training set lives in craft_data.py, the output folder and checkpoints in
craft_checkpoints.py, what the loop writes besides (validation, exports, model card) in craft_outputs.py.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os

import craft_checkpoints as ck
import craft_pipelines as cp
import craft_rewards as cr
import craft_utils as cu


# ----------------------------------------------------------------------------------------------------------------
# Flags


def add_training_args(parser, base_model, resolution, beta_dpo=None):
    """resolution, beta_dpo: the model family's defaults (diffusers' examples use 2500 for SD1.5, 5000 for SDXL);
    without beta_dpo the script trains the CRAFT loss only (no --loss flag)."""
    a = parser.add_argument
    a("--config", help="JSON or TOML file of flag defaults (keys = flag names); command-line flags win")
    a("--pretrained_model_name_or_path", default=base_model,
      help=f"the pipeline to fine-tune: Hub id or local folder (default: {base_model}, the family's base model)")
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
    a("--center_crop", action="store_true",
      help="center crop (default: a random crop, drawn once per image from --seed, the same every epoch)")
    a("--random_flip", action="store_true")
    a("--cache_latents", choices=["auto", "yes", "no"], default="auto",
      help="encode images and captions once, then move the VAE and frozen text encoders off the GPU until "
           "validation (auto: sets of up to 2,000 images)")
    a("--proportion_empty_prompts", type=float, default=0.0,
      help="caption dropout: keeps classifier-free guidance working (a guidance-distilled model has none)")
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
    a("--init_lora", help="start the LoRA from this LoRA file or folder instead of zeros (CRAFT in rounds: the "
                          "previous round's); it must have this run's --rank and target modules")
    a("--lora_alpha", type=int, help="LoRA alpha (default: --rank, i.e. scale 1)")
    a("--lora_target_modules", default="to_k,to_q,to_v,to_out.0", help="the denoiser's modules that get a LoRA")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int)
    a("--resume_from_checkpoint", help="'latest' or a checkpoint folder (absolute, or inside --output_dir)")
    a("--validation_prompt", action="append", help="repeatable")
    a("--num_validation_images", type=int, default=4)
    a("--validation_steps", type=int, help="validate every N steps (instead of every --validation_epochs)")
    a("--validation_epochs", type=int, default=1,
      help="validate at the end of every N-th epoch (a CRAFT set of ~100 images can be one step an epoch: prefer "
           "--validation_steps)")
    a("--validation_inference_steps", type=int, default=25)
    a("--validation_rewards", help="rewards of craft_rewards to score validation images with, e.g. jpeg,hpsv2.1")
    a("--report_to", default="tensorboard", help="one tracker (tensorboard, wandb, ...), all or none")
    a("--logging_dir", default="logs")
    a("--output_dir", default="craft-model")
    a("--overwrite_output_dir", action="store_true")
    a("--push_to_hub", action="store_true")
    a("--hub_model_id")
    a("--hub_token")
    a("--seed", type=int, default=0)
    a("--dataloader_num_workers", type=int, default=0)
    a("--enable_xformers_memory_efficient_attention", action="store_true")
    cr.add_reward_args(parser)  # the weights of --validation_rewards


def add_ddpm_args(parser):
    """The flags of families trained with DDPM's noise-prediction objective (SD1.5, SDXL): a script for such a family
    adds them; flow-matching scripts have their own (--weighting_scheme)."""
    parser.add_argument("--snr_gamma", type=float, help="min-SNR loss weighting (5.0 is the usual value)")
    parser.add_argument("--noise_offset", type=float, default=0.0,
                        help="add this much per-channel noise offset (darker and brighter images; 0.05-0.1 usual)")
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
    base_model = parser.get_default("pretrained_model_name_or_path")  # before a --config gives another
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
    cu.announce_default_model(args, base_model, input_args)
    for action in parser._actions:  # a --config value is not checked by argparse
        value = getattr(args, action.dest, None)
        if action.choices and value is not None and value not in action.choices:
            parser.error(f"--{action.dest} {value!r}: choose from {', '.join(map(str, action.choices))}")
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
    if args.init_lora and not os.path.exists(args.init_lora):
        parser.error(f"--init_lora {args.init_lora} does not exist")
    if args.lr_warmup_steps < 0:
        parser.error(f"--lr_warmup_steps must be >= 0 (got {args.lr_warmup_steps})")
    for tracker in [] if args.report_to in ("all", "none") else [args.report_to]:
        if importlib.util.find_spec(tracker) is None:  # accelerate would only warn, and log nothing
            parser.error(f"--report_to {tracker}: {tracker} is not installed; pip install {tracker}, or pass "
                         "--report_to none")
    if args.validation_rewards and not args.validation_prompt:
        parser.error("--validation_rewards scores the validation images: give --validation_prompt too")
    if args.validation_rewards:
        args.validation_reward_names = cr.parse_reward_names(args.validation_rewards, "--validation_rewards")
    ck.check_output_dir(args)
    return args


def check_model_family(path, revision, script, pipeline_class, flag=None):
    """Refuse, in one line, a pipeline of another family than the one `script` trains (its PIPELINE_CLASS), naming
    the script that trains that family, beside `script` or in the pack: whatever the scripts are called, a fork trains
    its own family and a new script needs no edit here. An image-to-image or inpainting class counts as its family's
    text-to-image pipeline (the same weights). A folder without model_index.json goes on to the script's loading.
    `flag`: the flag of a second model of the same family (a validation sibling), named instead."""
    import glob

    index = cp.read_model_index(path, revision, flag or "--pretrained_model_name_or_path")
    if index is None:  # a folder of parts: the script's loading says what is missing
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


def check_validation_model(path, script, pipeline_class):
    """--validation_model_name_or_path (a distilled sibling of the base): of the script's family, with a transformer
    to load; checked on every process before training, not at the first validation on the main process alone."""
    from diffusers import AutoModel

    check_model_family(path, None, script, pipeline_class, flag="--validation_model_name_or_path")
    try:
        AutoModel.load_config(path, subfolder="transformer")
    except (OSError, ValueError) as error:
        cu.fail(f"--validation_model_name_or_path {path}: no transformer to load ({str(error).splitlines()[0]})")


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
    that a weight without gradient left waiting. Hand it to ck.register_checkpoint_hooks (it holds Adam's state)."""

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
