#!/usr/bin/env python
"""CRAFT stage 7 for FLUX.2 [klein]: advantage-weighted LoRA fine-tuning of the klein transformer (4B or 9B), QLoRA
on a consumer GPU. A fork of train_craft_flux_lora.py: only the model, the text encoding, the latent normalisation
and the model's inputs differ.

    accelerate launch train_craft_flux2_klein_lora.py \\
      --pretrained_model_name_or_path black-forest-labs/FLUX.2-klein-base-4B --train_data_dir filtered \\
      --output_dir craft-klein-lora --mixed_precision bf16 --quantize_base nf4 --use_8bit_adam \\
      --gradient_checkpointing --rank 16 --resolution 1024

The forward process is flow matching, as for FLUX.1: x_t = (1 - sigma) * x_0 + sigma * noise, the transformer
predicts the velocity, target = noise - x_0, sigma drawn per sample (--weighting_scheme). The CRAFT loss is unchanged
in form:

    L = mean_i [ w_i * || v_theta(x_t, sigma_i, c_i) - (noise_i - x_0,i) ||^2 / (C H W) ]

with w_i the sample's CRF advantage. --loss dpo trains the Diffusion-DPO baseline on crf_filter.py --mode pairs's
folder, written for velocity prediction as in train_craft_flux_lora.py: the squared velocity errors of each pair's
preferred and rejected image (one noise, one sigma) against the base's (the LoRA switched off). FLUX.2's latents are
patchified 2x2 and normalised with the VAE's batch-norm statistics, then packed into tokens with 4-axis position
ids; the caption conditions through the Qwen3 encoder's hidden states at the pipeline's layers (9, 18, 27) stacked,
padded to --max_sequence_length (as the pipeline encodes a prompt), cached once with the latents, after which the
encoder and the VAE leave the GPU. klein base models sample with classifier-free guidance; their transformer has no
guidance input.

Output: pytorch_lora_weights.safetensors (Flux2KleinPipeline.load_lora_weights reads it), training_config.json,
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

PIPELINE_CLASS = "Flux2KleinPipeline"  # the family this script trains: model_index.json's _class_name
BASE_MODEL = "black-forest-labs/FLUX.2-klein-base-4B"  # --pretrained_model_name_or_path when none is given
LICENSE = "other"  # the model card's: klein 4B is Apache-2.0, klein 9B non-commercial: see the base model
MODEL_TAGS = ["flux2-klein", "flux2-klein-diffusers"]  # the model card's Hub tags for the family

# as diffusers' klein script targets: the double-stream blocks' image attention, and the single-stream blocks' fused
# q/k/v/MLP input and their output projection (named per block: the double blocks' to_out is a list; klein 9B has 24)
ATTENTION = ",".join(["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj"]
                     + [f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)])


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
                             "black-forest-labs/FLUX.2-klein-4B")
    parser.add_argument("--validation_guidance_scale", type=float,
                        help="the validation pipeline's guidance_scale (default: its own; the distilled klein needs "
                             "none)")
    parser.set_defaults(learning_rate=1e-4, lora_target_modules=ATTENTION)
    args = ct.parse_training_args(parser, input_args)
    if args.max_sequence_length < 1:
        parser.error("--max_sequence_length must be at least 1")
    return args


def load_models(args, weight_dtype):
    """Everything but the transformer, which loads once these have encoded the training set and left the GPU."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    ct.check_model_family(path, revision, __file__, PIPELINE_CLASS)
    if args.validation_model_name_or_path:
        ct.check_validation_model(args.validation_model_name_or_path, __file__, PIPELINE_CLASS)
    ct.check_quantize_base(args, weight_dtype)  # diffusers' own check that 4-bit loading works here
    try:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        # frozen weights load in the training dtype: klein 9B's Qwen3-8B encoder is 32 GB in fp32
        frozen = {"revision": revision, "variant": variant, "dtype": weight_dtype}
        text_encoder = Qwen3ForCausalLM.from_pretrained(path, subfolder="text_encoder", **frozen)
        vae = AutoencoderKLFlux2.from_pretrained(path, subfolder="vae", **frozen)
    except (OSError, ValueError) as error:
        cu.fail(f"could not load a FLUX.2 [klein] pipeline from {path} ({str(error).splitlines()[0]})")
    return scheduler, tokenizer, text_encoder, vae


def load_transformer(args, weight_dtype, device, path=None):
    """The transformer of the base (or of `path`, the validation model) on `device`: in the training dtype, or
    (--quantize_base nf4) quantized to 4 bits as it loads."""
    from diffusers import Flux2Transformer2DModel

    # the validation model loads its own default weights: the base's revision and variant need not exist there
    path, revision, variant = (path, None, None) if path else (args.pretrained_model_name_or_path, args.revision,
                                                                args.variant)
    quantization = ct.nf4_config(weight_dtype) if args.quantize_base else None
    try:
        transformer = Flux2Transformer2DModel.from_pretrained(
            path, subfolder="transformer", revision=revision, variant=variant, dtype=weight_dtype,
            quantization_config=quantization, **({"device_map": {"": str(device)}} if quantization else {}))
    except (OSError, ValueError) as error:
        cu.fail(f"could not load a FLUX.2 transformer from {path} ({str(error).splitlines()[0]})")
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
    from diffusers import Flux2KleinPipeline
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
    patching = 2 * 2 ** (len(vae.config.block_out_channels) - 1)  # VAE downsampling x the 2x2 patchify
    if args.resolution % patching:
        cu.fail(f"--resolution {args.resolution} must be a multiple of {patching} for this model (VAE x 2x2 patches)")
    # the batch-norm statistics FLUX.2 normalises its patchified latents with
    latents_mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
    latents_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
    # What trains: a LoRA on the attention projections of the double- and single-stream blocks.
    lora_alpha = args.lora_alpha or args.rank
    lora_config = {"r": args.rank, "lora_alpha": lora_alpha, "init_lora_weights": "gaussian",
                   "target_modules": args.lora_target_modules.split(",")}

    def encode_images(pixels):
        """-> the VAE posterior's mean and std; the loop draws a new sample from it at every step."""
        dist = vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def encode_prompt(captions):
        """The pipeline's own encoding: the chat-formatted caption through Qwen3, the hidden states of the layers
        the pipeline reads stacked per token, padded to --max_sequence_length."""
        return {"prompt_embeds": Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder, tokenizer, captions, device=accelerator.device,
            max_sequence_length=args.max_sequence_length)}

    def move_frozen(device, modules=(vae, text_encoder)):
        for module in modules:
            module.to(device)
        free_memory()

    for module in (vae, text_encoder):
        module.to(accelerator.device)
    # CRAFT's sets are tiny: encode every image (both flips) and caption once, then free the VAE and the text encoder
    # (Qwen3-8B is 16 GB in bf16) before the transformer loads, so they never share the GPU (unless --cache_latents
    # no keeps them there to encode every step).
    cache = cd.should_cache(args, examples)
    encodings = cd.Encodings(examples, args, encode_images, encode_prompt, cache,
                             show_progress=accelerator.is_local_main_process)
    with torch.no_grad():  # validation prompts too (and the empty negative prompt): the encoder never comes back
        validation_inputs = {prompt: {name: encode_prompt([text])["prompt_embeds"].cpu()
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
    if args.enable_xformers_memory_efficient_attention:
        transformer.enable_xformers_memory_efficient_attention()
    if args.init_lora:  # CRAFT in rounds: this round's LoRA starts where the previous round's ended
        ck.load_lora_into(Flux2KleinPipeline, trained, args.init_lora, f"--init_lora {args.init_lora}")
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
    ck.register_checkpoint_hooks(accelerator, Flux2KleinPipeline, trained, is_lora=True)
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
        pipeline = Flux2KleinPipeline.from_pretrained(
            model or args.pretrained_model_name_or_path, transformer=denoiser, vae=vae, text_encoder=None,
            tokenizer=None, revision=None if model else args.revision, variant=None if model else args.variant,
        ).to(accelerator.device)
        inputs = {prompt: {name: value.to(accelerator.device, weight_dtype) for name, value in embeds.items()}
                  for prompt, embeds in validation_inputs.items()}
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
                latents = Flux2KleinPipeline._patchify_latents(latents)  # 2x2 patches as channels
                latents = (latents - latents_mean.to(latents.device)) / latents_std.to(latents.device)
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
                target = Flux2KleinPipeline._pack_latents(noise - latents)

                # the transformer's inputs: the patches as tokens with their (t, h, w, l) ids, the text tokens' ids
                prompt_embeds = text["prompt_embeds"].to(latents.device, weight_dtype)

                def predict(transformer):
                    return transformer(hidden_states=Flux2KleinPipeline._pack_latents(noisy_latents).to(weight_dtype),
                                       timestep=timesteps / 1000, guidance=None, encoder_hidden_states=prompt_embeds,
                                       txt_ids=Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(latents.device),
                                       img_ids=Flux2KleinPipeline._prepare_latent_ids(latents).to(latents.device),
                                       return_dict=False)[0]

                # the per-sample error ||v_i - (noise_i - x0_i)||^2 / (C*H*W); the packed target holds the same
                # elements as the latents
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
            co.save_lora(Flux2KleinPipeline, folder, {"transformer": accelerator.unwrap_model(transformer)})
        co.finish(args, stats, is_lora=True, license=LICENSE, model_tags=MODEL_TAGS)
    accelerator.end_training()


if __name__ == "__main__":
    args = parse_args()
    with cu.write_faults_in_one_line(args.output_dir):
        main(args)
