#!/usr/bin/env python
"""CRAFT stage 7 for Z-Image: advantage-weighted LoRA fine-tuning of Z-Image's single-stream transformer, QLoRA on a
consumer GPU. A fork of train_craft_flux_lora.py: only the model, the caption features and the model call differ.

    accelerate launch train_craft_zimage_lora.py --pretrained_model_name_or_path Tongyi-MAI/Z-Image \\
      --train_data_dir filtered --output_dir craft-zimage-lora --mixed_precision bf16 --quantize_base nf4 \\
      --use_8bit_adam --gradient_checkpointing --rank 16 --resolution 1024

The forward process is flow matching, as for FLUX: x_t = (1 - sigma) * x_0 + sigma * noise, target = noise - x_0,
sigma drawn per sample (--weighting_scheme). Z-Image's transformer is told the time as (1000 - t) / 1000 and predicts
the negated velocity, so the loss compares -prediction with the target (diffusers' train_dreambooth_lora_z_image.py
does the same). The CRAFT loss is unchanged in form:

    L = mean_i [ w_i * || -v_theta(x_t, (1000 - t_i) / 1000, c_i) - (noise_i - x_0,i) ||^2 / (C H W) ]

with w_i the sample's CRF advantage. --loss dpo trains the Diffusion-DPO baseline on crf_filter.py --mode pairs's
folder, written for velocity prediction as in train_craft_flux_lora.py: the squared velocity errors of each pair's
preferred and rejected image (one noise, one sigma) against the base's (the LoRA switched off). The caption
conditions through the Qwen3 encoder's second-to-last hidden states of the chat-formatted prompt, one feature per
real token: the cache keeps them padded to --max_sequence_length with their mask, and the transformer gets each
caption's unpadded features. Latents and caption features are cached once, after which the encoder and the VAE leave
the GPU.

Output: pytorch_lora_weights.safetensors (ZImagePipeline.load_lora_weights reads it), training_config.json,
validation grids and a model card.
"""

import argparse
import math
import statistics

import craft_checkpoints as ck
import craft_outputs as co
import craft_data as cd
import craft_training as ct
import craft_utils as cu

PIPELINE_CLASS = "ZImagePipeline"  # the family this script trains: model_index.json's _class_name
BASE_MODEL = "Tongyi-MAI/Z-Image"  # --pretrained_model_name_or_path when none is given
LICENSE = "apache-2.0"  # the model card's: Z-Image's, which a fine-tune inherits
MODEL_TAGS = ["z-image"]  # the model card's Hub tags for the family

ATTENTION = "to_k,to_q,to_v,to_out.0"  # the attention of every block, as diffusers' Z-Image script targets


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ct.add_training_args(parser, BASE_MODEL, resolution=1024, beta_dpo=5000)
    ct.add_flow_matching_args(parser)
    parser.add_argument("--max_sequence_length", type=int, default=512,
                        help="Qwen3 tokens per chat-formatted caption (the pipeline's 512)")
    parser.add_argument("--validation_model_name_or_path",
                        help="validate (grids, --validation_rewards) with the trained LoRA on this pipeline of the "
                             "same family instead of the base: the distilled model users run the LoRA on, loaded "
                             "beside the trained one for each validation, e.g. "
                             "Tongyi-MAI/Z-Image-Turbo")
    parser.add_argument("--validation_guidance_scale", type=float,
                        help="the validation pipeline's guidance_scale (default: its own; 0 for Z-Image-Turbo)")
    parser.set_defaults(learning_rate=1e-4, lora_target_modules=ATTENTION)
    args = ct.parse_training_args(parser, input_args)
    if args.enable_xformers_memory_efficient_attention:  # diffusers' xformers processor drops the rotary embedding
        parser.error("--enable_xformers_memory_efficient_attention: Z-Image's attention (rotary positions, q/k norms) "
                     "has no xformers processor in diffusers; leave it out (PyTorch's attention is used)")
    if args.max_sequence_length < 1:
        parser.error("--max_sequence_length must be at least 1")
    return args


def load_models(args, weight_dtype):
    """Everything but the transformer, which loads once these have encoded the training set and left the GPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import AutoModel, AutoTokenizer

    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    ct.check_model_family(path, revision, __file__, PIPELINE_CLASS)
    if args.validation_model_name_or_path:
        ct.check_validation_model(args.validation_model_name_or_path, __file__, PIPELINE_CLASS)
    ct.check_quantize_base(args, weight_dtype)  # diffusers' own check that 4-bit loading works here
    try:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        # frozen weights load in the training dtype: the Qwen3-4B encoder is 16 GB in fp32
        frozen = {"revision": revision, "variant": variant, "dtype": weight_dtype}
        text_encoder = AutoModel.from_pretrained(path, subfolder="text_encoder", **frozen)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **frozen)
    except (OSError, ValueError) as error:
        cu.fail(f"could not load a Z-Image pipeline from {path} ({str(error).splitlines()[0]})")
    return scheduler, tokenizer, text_encoder, vae


def load_transformer(args, weight_dtype, device, path=None):
    """The transformer of the base (or of `path`, the validation model) on `device`: in the training dtype, or
    (--quantize_base nf4) quantized to 4 bits as it loads."""
    from diffusers import ZImageTransformer2DModel

    # the validation model loads its own default weights: the base's revision and variant need not exist there
    path, revision, variant = (path, None, None) if path else (args.pretrained_model_name_or_path, args.revision,
                                                                args.variant)
    quantization = ct.nf4_config(weight_dtype) if args.quantize_base else None
    try:
        transformer = ZImageTransformer2DModel.from_pretrained(
            path, subfolder="transformer", revision=revision, variant=variant, dtype=weight_dtype,
            quantization_config=quantization, **({"device_map": {"": str(device)}} if quantization else {}))
    except (OSError, ValueError) as error:
        cu.fail(f"could not load a Z-Image transformer from {path} ({str(error).splitlines()[0]})")
    return transformer.to(device) if not quantization else transformer


def draw_sigma_positions(draws, args):
    """u in [0, 1] per sample, from each sample's own seed: uniform, logit-normal, or the 'mode' density (diffusers'
    compute_density_for_timestep_sampling, which draws from the global generator)."""
    import torch

    if args.weighting_scheme == "logit_normal":
        return torch.sigmoid(args.logit_mean + args.logit_std * draws.randn())
    u = draws.rand()
    if args.weighting_scheme == "mode":
        u = 1 - u - args.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def main(args):
    import torch
    from diffusers import ZImagePipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, free_memory
    from peft import LoraConfig
    from tqdm.auto import tqdm

    accelerator = ct.make_accelerator(args)
    torch.manual_seed(args.seed)  # LoRA's initial weights
    examples, weights_note = cd.load_examples(args)  # every bad row is refused before a model loads
    weight_dtype = ct.weight_dtype_of(accelerator)
    noise_scheduler, tokenizer, text_encoder, vae = load_models(args, weight_dtype)
    for frozen in (text_encoder, vae):
        frozen.requires_grad_(False)
    patching = 2 * 2 ** (len(vae.config.block_out_channels) - 1)  # VAE downsampling x the transformer's 2x2 patches
    if args.resolution % patching:
        cu.fail(f"--resolution {args.resolution} must be a multiple of {patching} for this model (VAE x 2x2 patches)")
    # What trains: a LoRA on the attention projections of every block.
    lora_alpha = args.lora_alpha or args.rank
    lora_config = {"r": args.rank, "lora_alpha": lora_alpha, "init_lora_weights": "gaussian",
                   "target_modules": args.lora_target_modules.split(",")}

    def encode_images(pixels):
        """-> the VAE posterior's mean and std; the loop draws a new sample from it at every step."""
        dist = vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def encode_prompt(captions):
        """The Qwen3 encoder's second-to-last hidden states of each chat-formatted caption (as ZImagePipeline encodes
        a prompt), padded to --max_sequence_length, and the mask of its real tokens."""
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True)
                 for caption in captions]
        tokens = tokenizer(chats, padding="max_length", max_length=args.max_sequence_length, truncation=True,
                           return_tensors="pt").to(accelerator.device)
        mask = tokens.attention_mask.bool()
        hidden = text_encoder(input_ids=tokens.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return {"prompt_embeds": hidden[-2], "prompt_mask": mask}

    def caption_features(text, device):
        """The transformer's caption input: each caption's features of its real tokens only."""
        return [embeds[mask].to(device, weight_dtype) for embeds, mask in zip(text["prompt_embeds"],
                                                                              text["prompt_mask"])]

    def move_frozen(device, modules=(vae, text_encoder)):
        for module in modules:
            module.to(device)
        free_memory()

    for module in (vae, text_encoder):
        module.to(accelerator.device)
    # CRAFT's sets are tiny: encode every image (both flips) and caption once, then free the VAE and the text encoder
    # (Qwen3-4B is 8 GB in bf16) before the transformer loads, so they never share the GPU (unless --cache_latents no
    # keeps them there to encode every step).
    cache = cd.should_cache(args, examples)
    encodings = cd.Encodings(examples, args, encode_images, encode_prompt, cache,
                             show_progress=accelerator.is_local_main_process)
    with torch.no_grad():  # validation prompts too (and the empty negative prompt): the encoder never comes back
        validation_inputs = {prompt: {name: caption_features(encode_prompt([text]), "cpu")
                                      for name, text in (("prompt_embeds", prompt), ("negative_prompt_embeds", ""))}
                             for prompt in args.validation_prompt or []}
    if cache:
        move_frozen("cpu")

    transformer = load_transformer(args, weight_dtype, accelerator.device).requires_grad_(False)
    if args.quantize_base:
        from peft import prepare_model_for_kbit_training

        transformer = prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)
    transformer.add_adapter(LoraConfig(**lora_config))
    trained = {"transformer": transformer}
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.init_lora:  # CRAFT in rounds: this round's LoRA starts where the previous round's ended
        ck.load_lora_into(ZImagePipeline, trained, args.init_lora, f"--init_lora {args.init_lora}")
    cast_training_params([transformer], torch.float32)  # no "Attempting to unscale FP16 gradients"

    params_to_optimize = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = ct.make_optimizer(params_to_optimize, args, accelerator.num_processes)
    train_dataset, train_dataloader = cd.make_dataloader(examples, args, cached=cache)
    num_update_steps_per_epoch = math.ceil(
        len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * num_update_steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    ck.register_checkpoint_hooks(accelerator, ZImagePipeline, trained, is_lora=True)
    transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, train_dataloader, lr_scheduler)

    ck.claim_output_dir(accelerator, args)  # this run's alone; what an earlier run left is settled
    if accelerator.is_main_process:
        accelerator.init_trackers("craft", config={k: v for k, v in vars(args).items()
                                                   if isinstance(v, (int, float, str, bool))})
    global_step = ck.resume(accelerator, args)
    first_epoch, skip_batches = divmod(global_step, num_update_steps_per_epoch)
    skip_batches *= args.gradient_accumulation_steps
    rewards = co.load_validation_rewards(args, accelerator)

    def log_validation(step):
        if not accelerator.is_main_process:
            return
        move_frozen(accelerator.device, [vae])
        transformer.eval()
        denoiser, model = accelerator.unwrap_model(transformer), args.validation_model_name_or_path
        if model:  # the LoRA as users run it: on the distilled sibling, loaded for this validation only
            denoiser = co.lora_copied_onto(denoiser, load_transformer(args, weight_dtype, accelerator.device, model))
        pipeline = ZImagePipeline.from_pretrained(
            model or args.pretrained_model_name_or_path, transformer=denoiser, vae=vae, text_encoder=None,
            tokenizer=None, revision=None if model else args.revision, variant=None if model else args.variant,
        ).to(accelerator.device)
        inputs = {prompt: {name: [value.to(accelerator.device) for value in features]
                           for name, features in embeds.items()} for prompt, embeds in validation_inputs.items()}
        guidance = {} if args.validation_guidance_scale is None else {"guidance_scale": args.validation_guidance_scale}
        co.log_validation(pipeline, args, accelerator, rewards, step, inputs, height=args.resolution,
                          width=args.resolution, **guidance)
        del pipeline, denoiser
        free_memory()
        transformer.train()
        if cache:
            move_frozen("cpu", [vae])

    accelerator.print(
        f"{len(examples)} training {'pairs' if args.loss == 'dpo' else 'images'} ({weights_note}); latents "
        f"{'cached' if cache else 'encoded'}, text " + ("cached" if cache else "encoded each step")
        + f"; {max_train_steps} steps of {args.train_batch_size} x {args.gradient_accumulation_steps} x "
          f"{accelerator.num_processes} {'pairs' if args.loss == 'dpo' else 'images'}")
    if args.validation_prompt and global_step == 0:  # the starting model: later validations are compared with it
        log_validation(0)
    progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="steps",
                        disable=not accelerator.is_local_main_process)
    clock, losses, accuracies = co.StepClock(), [], []
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:  # resumed from the last checkpoint: only the outputs are left to write
            break
        train_dataset.epoch = epoch  # the epoch's seeded order and flips
        transformer.train()
        resumed_epoch = epoch == first_epoch and skip_batches > 0
        batches = accelerator.skip_first_batches(train_dataloader, skip_batches) if resumed_epoch else train_dataloader
        for batch in batches:
            # each sample's draws come from its own seed: resumed, or on any number of GPUs, the run is the same
            draws = cd.SampleRandom(args.seed, epoch, batch["index"])
            with accelerator.accumulate(transformer):
                captions = cd.drop_captions(batch["caption"], args.proportion_empty_prompts, draws)
                mean, std, _ = encodings.latent_dist(batch)
                latents, copies = mean + std * draws.randn(*mean.shape[1:]).to(mean.device), 1
                if args.loss == "dpo":  # each pair's rejected image goes after the batch's preferred ones
                    mean, std, _ = encodings.latent_dist(batch, rejected=True)
                    rejected = mean + std * draws.randn(*mean.shape[1:]).to(mean.device)
                    latents, copies = torch.cat([latents, rejected]), 2
                latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
                text = {name: value.repeat(copies, *[1] * (value.dim() - 1))
                        for name, value in encodings.text(captions).items()}

                # flow matching: noise, a sigma per sample from --weighting_scheme (a pair's images share both), the
                # straight path between them
                noise = draws.randn(*latents.shape[1:]).to(latents.device).repeat(copies, 1, 1, 1)
                positions = (draw_sigma_positions(draws, args) * noise_scheduler.config.num_train_timesteps).long()
                positions = positions.clamp(max=noise_scheduler.config.num_train_timesteps - 1)  # 'mode' reaches u = 1
                positions = positions.repeat(copies)
                timesteps = noise_scheduler.timesteps[positions].to(latents.device)
                sigmas = noise_scheduler.sigmas[positions].to(latents.device).view(-1, 1, 1, 1)
                noisy_latents = (1 - sigmas) * latents + sigmas * noise
                target = noise - latents

                # Z-Image's transformer takes lists (a latent per sample, with a frame axis; each caption's own
                # features), the time as (1000 - t) / 1000, and predicts the negated velocity
                def predict(transformer):
                    predictions = transformer(list(noisy_latents.to(weight_dtype).unsqueeze(2).unbind(0)),
                                              (1000 - timesteps) / 1000, caption_features(text, latents.device),
                                              return_dict=False)[0]
                    return -torch.stack(predictions).squeeze(2)

                # the per-sample error ||v_i - (noise_i - x0_i)||^2 / (C*H*W)
                per_sample_loss = ct.per_sample_mse(predict(transformer), target)
                if args.loss == "craft":
                    # The CRAFT loss: L = mean_i [ w_i * ||v_i - (noise_i - x0_i)||^2 / (C*H*W) ], w_i the sample's
                    # weight (its CRF advantage; 1 in plain SFT).
                    loss = (per_sample_loss * batch["weight"].to(per_sample_loss.device)).mean()
                else:
                    # Diffusion-DPO on velocities: the squared velocity errors e of the model and of the base (the LoRA
                    # off) on each pair's preferred (w) and rejected (l) image, one noise and one sigma per pair
                    with torch.no_grad(), ct.adapters_disabled(accelerator.unwrap_model(transformer)):
                        reference_loss = ct.per_sample_mse(predict(accelerator.unwrap_model(transformer)), target)
                    loss, inside = ct.diffusion_dpo_loss(per_sample_loss, reference_loss, args.beta_dpo)
                    # the share of pairs where the model prefers w more than the base does
                    accuracies.append(accelerator.gather((inside > 0).float()).mean().item())

                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()).mean().item())
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            clock.step_done(global_step)
            logs = {"loss": statistics.fmean(losses), "lr": lr_scheduler.get_last_lr()[0]}
            ct.stop_if_diverged(logs["loss"], global_step, args)
            if accuracies:
                logs["implicit_acc"] = statistics.fmean(accuracies)
            losses, accuracies = [], []
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                ck.save_checkpoint(accelerator, args, global_step)
            if args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0:
                log_validation(global_step)
            if global_step >= max_train_steps:
                break
        if args.validation_prompt and not args.validation_steps and (epoch + 1) % args.validation_epochs == 0:
            log_validation(global_step)
        if global_step >= max_train_steps:
            break
    progress_bar.close()

    accelerator.wait_for_everyone()
    stats = co.run_stats(examples, weights_note, cache, clock, global_step)
    if accelerator.is_main_process:
        with ck.written_whole(args.output_dir) as folder:
            co.save_lora(ZImagePipeline, folder, {"transformer": accelerator.unwrap_model(transformer)})
        co.finish(args, stats, is_lora=True, license=LICENSE, model_tags=MODEL_TAGS)
    accelerator.end_training()


if __name__ == "__main__":
    args = parse_args()
    with cu.write_faults_in_one_line(args.output_dir):
        main(args)
