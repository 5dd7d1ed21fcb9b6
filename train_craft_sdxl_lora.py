#!/usr/bin/env python
"""CRAFT stage 7 for SDXL: advantage-weighted LoRA fine-tuning that fits a consumer GPU.

    accelerate launch train_craft_sdxl_lora.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix --train_data_dir filtered \\
      --mixed_precision bf16 --use_8bit_adam --gradient_checkpointing --rank 16 --output_dir craft-sdxl-lora

The loss is train_craft_sd15.py's: per-sample denoising MSE times the sample's CRAFT weight, averaged over the batch;
with --loss dpo, Diffusion-DPO on crf_filter.py --mode pairs's folder, against the base (the LoRAs switched off).
CRAFT's sets are tiny (~100 images), so latents and both text encoders' embeddings are computed once and the VAE and
text encoders leave the GPU (unlike diffusers' SDXL LoRA script, which re-encodes every step); with
--train_text_encoder the encoders get LoRAs too and the captions are encoded every step. Each sample keeps its own
SDXL micro-conditioning: original size, crop top-left (mirrored by a flip) and target size.

Output: pytorch_lora_weights.safetensors (StableDiffusionXLPipeline.load_lora_weights reads it), with
--output_kohya_format a kohya file for A1111/ComfyUI, training_config.json, validation grids and a model card.
"""

import argparse
import math
import statistics

import craft_checkpoints as ck
import craft_outputs as co
import craft_data as cd
import craft_training as ct
import craft_utils as cu

PIPELINE_CLASS = "StableDiffusionXLPipeline"  # the family this script trains: model_index.json's _class_name
BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"  # --pretrained_model_name_or_path when none is given
LICENSE = "openrail++"  # the model card's: SDXL's, which a fine-tune inherits
MODEL_TAGS = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]  # the model card's Hub tags for the family


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ct.add_training_args(parser, BASE_MODEL, resolution=1024, beta_dpo=5000)
    ct.add_ddpm_args(parser)
    parser.add_argument("--pretrained_vae_model_name_or_path",
                        help="a VAE that works in fp16 (madebyollin/sdxl-vae-fp16-fix); without it the VAE stays fp32")
    parser.add_argument("--train_text_encoder", action="store_true",
                        help="LoRA on both text encoders too (captions are then encoded every step)")
    parser.add_argument("--output_kohya_format", action="store_true",
                        help="also write pytorch_lora_weights_kohya.safetensors (kohya's names, for A1111/ComfyUI)")
    parser.set_defaults(learning_rate=1e-4)
    return ct.parse_training_args(parser, input_args)


def text_encoder_class(path, subfolder, revision):
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, subfolder=subfolder, revision=revision)
    return getattr(transformers, config.architectures[0])


def load_models(args):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    ct.check_model_family(path, revision, __file__, PIPELINE_CLASS)
    try:
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant)
        if unet.config.addition_embed_type != "text_time":
            cu.fail(f"{path} is an SD1.5-style model (no SDXL micro-conditioning); use train_craft_sd15.py")
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=f, revision=revision, use_fast=False)
                      for f in ("tokenizer", "tokenizer_2")]
        encoders = [text_encoder_class(path, f, revision).from_pretrained(path, subfolder=f, revision=revision,
                                                                         variant=variant)
                    for f in ("text_encoder", "text_encoder_2")]
        vae_path = args.pretrained_vae_model_name_or_path or path
        vae = AutoencoderKL.from_pretrained(vae_path, subfolder=None if args.pretrained_vae_model_name_or_path
                                            else "vae", revision=revision, variant=variant)
    except (OSError, ValueError) as error:
        cu.fail(f"could not load an SDXL pipeline from {path} ({str(error).splitlines()[0]})")
    return scheduler, tokenizers, encoders, vae, unet


def time_ids(sizes, resolution):
    """SDXL micro-conditioning, one row per sample: original (h, w), crop top-left (y, x), target (h, w)."""
    import torch

    return torch.tensor([[*original, *crop, resolution, resolution]
                         for original, crop in zip(sizes["original_size"], sizes["crop_top_left"])], dtype=torch.float32)


def main(args):
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, free_memory
    from peft import LoraConfig, inject_adapter_in_model
    from tqdm.auto import tqdm

    # the first text encoder's last layer is not read (SDXL takes its penultimate hidden states): its LoRA gets no
    # gradient, which DDP must expect
    accelerator = ct.make_accelerator(args, find_unused_parameters=args.train_text_encoder)
    torch.manual_seed(args.seed)  # LoRA's initial weights
    examples, weights_note = cd.load_examples(args)  # every bad row is refused before a model loads
    noise_scheduler, (tokenizer, tokenizer_2), (text_encoder, text_encoder_2), vae, unet = load_models(args)
    if args.prediction_type:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for frozen in (text_encoder, text_encoder_2, vae, unet):
        frozen.requires_grad_(False)
    weight_dtype = ct.weight_dtype_of(accelerator)

    # What trains: a LoRA on the UNet's attention, and with --train_text_encoder on both text encoders' too.
    lora_alpha = args.lora_alpha or args.rank
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                target_modules=args.lora_target_modules.split(",")))
    if args.train_text_encoder:
        # peft's own injection: transformers 5.2x's add_adapter asks for a peft (>= 0.22) not released yet
        text_lora = LoraConfig(r=args.rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
        inject_adapter_in_model(text_lora, text_encoder)
        inject_adapter_in_model(text_lora, text_encoder_2)
    trained = {"unet": unet}
    if args.train_text_encoder:
        trained.update(text_encoder=text_encoder, text_encoder_2=text_encoder_2)

    def encode_images(pixels):
        """-> the VAE posterior's mean and std; the loop draws a new sample from it at every step."""
        dist = vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def encode_prompt(captions, text_encoders):
        """Both encoders' penultimate hidden states, concatenated, and the second encoder's pooled embedding."""
        embeds = []
        for tokenizer_, encoder in zip((tokenizer, tokenizer_2), text_encoders):
            ids = tokenizer_(captions, padding="max_length", max_length=tokenizer_.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
            output = encoder(ids.to(accelerator.device), output_hidden_states=True)
            embeds.append(output.hidden_states[-2])
        return {"prompt_embeds": torch.cat(embeds, dim=-1), "pooled_prompt_embeds": output[0]}

    def move_frozen(device):
        vae.to(device)
        if not args.train_text_encoder:
            text_encoder.to(device)
            text_encoder_2.to(device)
        free_memory()

    # The SDXL VAE overflows in fp16 (NaN, black images): it stays fp32 unless a VAE made for fp16 is given.
    vae.to(accelerator.device, weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32)
    text_encoder.to(accelerator.device, weight_dtype)
    text_encoder_2.to(accelerator.device, weight_dtype)
    # CRAFT's sets are tiny: encode every image (both flips) and caption once, then free the VAE and both frozen text
    # encoders before the UNet arrives (diffusers' SDXL LoRA script runs all three every step). Text encoders that
    # train encode the captions every step.
    cache = cd.should_cache(args, examples)
    encode_frozen = None if args.train_text_encoder else \
        (lambda captions: encode_prompt(captions, (text_encoder, text_encoder_2)))
    encodings = cd.Encodings(examples, args, encode_images, encode_frozen, cache,
                             show_progress=accelerator.is_local_main_process)
    if cache:
        move_frozen("cpu")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.activation_checkpointing_enable()
            text_encoder_2.activation_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    unet.to(accelerator.device, weight_dtype)
    if args.init_lora:  # CRAFT in rounds: this round's LoRA starts where the previous round's ended
        ck.load_lora_into(StableDiffusionXLPipeline, trained, args.init_lora, f"--init_lora {args.init_lora}")
    cast_training_params(list(trained.values()), torch.float32)  # no "Attempting to unscale FP16 gradients"

    params_to_optimize = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
    optimizer = ct.make_optimizer(params_to_optimize, args, accelerator.num_processes)
    train_dataset, train_dataloader = cd.make_dataloader(examples, args, cached=cache)
    num_update_steps_per_epoch = math.ceil(
        len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * num_update_steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    ck.register_checkpoint_hooks(accelerator, StableDiffusionXLPipeline, trained, is_lora=True)
    if args.train_text_encoder:
        unet, text_encoder, text_encoder_2, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, text_encoder_2, optimizer, train_dataloader, lr_scheduler)
        models_to_train = [unet, text_encoder, text_encoder_2]  # as prepared (DDP-wrapped)
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, train_dataloader, lr_scheduler)
        models_to_train = [unet]

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
        move_frozen(accelerator.device)
        for module in trained.values():
            module.eval()
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            args.pretrained_model_name_or_path, unet=accelerator.unwrap_model(unet), vae=vae,
            text_encoder=accelerator.unwrap_model(text_encoder), text_encoder_2=accelerator.unwrap_model(text_encoder_2),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, revision=args.revision,
            variant=args.variant).to(accelerator.device)
        co.log_validation(pipeline, args, accelerator, rewards, step)
        del pipeline
        for module in trained.values():
            module.train()
        if cache:
            move_frozen("cpu")

    accelerator.print(
        f"{len(examples)} training {'pairs' if args.loss == 'dpo' else 'images'} ({weights_note}); "
        f"latents {'cached' if cache else 'encoded'}, text "
        + ("encoded each step (the text encoders train)" if args.train_text_encoder else
           "cached" if cache else "encoded each step")
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
        for module in models_to_train:
            module.train()
        resumed_epoch = epoch == first_epoch and skip_batches > 0
        batches = accelerator.skip_first_batches(train_dataloader, skip_batches) if resumed_epoch else train_dataloader
        for batch in batches:
            # each sample's draws come from its own seed: resumed, or on any number of GPUs, the run is the same
            draws = cd.SampleRandom(args.seed, epoch, batch["index"])
            with accelerator.accumulate(*models_to_train):
                captions = cd.drop_captions(batch["caption"], args.proportion_empty_prompts, draws)
                mean, std, sizes = encodings.latent_dist(batch)
                latents = (mean + std * draws.randn(*mean.shape[1:]).to(mean.device)) * vae.config.scaling_factor
                # SDXL's micro-conditioning, per sample: original size, crop top-left (mirrored by a flip), target size
                add_time_ids = time_ids(sizes, args.resolution).to(latents)
                copies = 1
                if args.loss == "dpo":  # each pair's rejected image goes after the batch's preferred ones
                    mean, std, sizes = encodings.latent_dist(batch, rejected=True)
                    rejected = (mean + std * draws.randn(*mean.shape[1:]).to(mean.device)) * vae.config.scaling_factor
                    latents, copies = torch.cat([latents, rejected]), 2
                    add_time_ids = torch.cat([add_time_ids, time_ids(sizes, args.resolution).to(latents)])

                def encode_text(captions):
                    text = encode_prompt(captions, (text_encoder, text_encoder_2)) if args.train_text_encoder \
                        else encodings.text(captions)
                    return {name: value.repeat(copies, *[1] * (value.dim() - 1)) for name, value in text.items()}

                # the forward diffusion: noise, a uniform timestep per sample (a pair's images share both), the target
                noise = draws.randn(*latents.shape[1:]).to(latents.device)
                if args.noise_offset:
                    noise = noise + args.noise_offset * draws.randn(latents.shape[1], 1, 1).to(latents.device)
                timesteps = draws.randint(noise_scheduler.config.num_train_timesteps).to(latents.device)
                noise, timesteps = noise.repeat(copies, 1, 1, 1), timesteps.repeat(copies)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                else:
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)

                def predict(unet, text):
                    return unet(noisy_latents.to(weight_dtype), timesteps,
                                encoder_hidden_states=text["prompt_embeds"].to(latents.device),
                                added_cond_kwargs={"text_embeds": text["pooled_prompt_embeds"].to(latents.device),
                                                   "time_ids": add_time_ids}).sample

                per_sample_loss = ct.per_sample_mse(predict(unet, encode_text(captions)), target)
                if args.loss == "craft":
                    # The CRAFT loss: L = mean_i [ w_i * s_i * ||pred_i - target_i||^2 / (C*H*W) ], w_i the sample's
                    # weight (its CRF advantage; 1 in plain SFT), s_i the min-SNR factor (1 without --snr_gamma). No
                    # reference model and no KL term: the short schedule and the small learning rate keep the model
                    # near the base.
                    if args.snr_gamma:
                        per_sample_loss = per_sample_loss * ct.min_snr_weights(noise_scheduler, timesteps,
                                                                               args.snr_gamma)
                    loss = (per_sample_loss * batch["weight"].to(per_sample_loss.device)).mean()
                else:
                    # Diffusion-DPO: L = mean_i -log sigmoid(-beta/2 * ((e_w - e_l) - (e_ref_w - e_ref_l))), the
                    # errors e of the model and of the base (LoRAs off) on each pair's preferred (w) and rejected (l)
                    with torch.no_grad(), ct.adapters_disabled(*(accelerator.unwrap_model(m) for m in models_to_train)):
                        reference_pred = predict(accelerator.unwrap_model(unet), encode_text(captions))
                    loss, inside = ct.diffusion_dpo_loss(per_sample_loss, ct.per_sample_mse(reference_pred, target),
                                                         args.beta_dpo)
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
        lora_models = {name: accelerator.unwrap_model(module) for name, module in trained.items()}
        with ck.written_whole(args.output_dir) as folder:
            co.save_lora(StableDiffusionXLPipeline, folder, lora_models)
            if args.output_kohya_format:
                co.save_kohya(folder, lora_models, lora_alpha, one_text_encoder=False)
        co.finish(args, stats, is_lora=True, license=LICENSE, model_tags=MODEL_TAGS)
    accelerator.end_training()


if __name__ == "__main__":
    args = parse_args()
    with cu.write_faults_in_one_line(args.output_dir):
        main(args)
