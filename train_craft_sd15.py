#!/usr/bin/env python
"""CRAFT stage 7 for SD1.5-family models: advantage-weighted fine-tuning, full UNet or LoRA.

    accelerate launch train_craft_sd15.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --train_data_dir filtered --output_dir craft-sd15 [--use_lora --rank 16] [--use_8bit_adam]

The loss is the standard denoising MSE (epsilon or v-prediction target) per sample, times the sample's weight
(crf_filter.py's advantage, column --weight_column; 1 for every sample with --weight_column none), averaged over
the batch; the loop in main() computes it where the comment shows this formula:

    L = mean_i [ w_i * s_i * || eps_theta(x_t, t, c_i) - target_i ||^2 / (C H W) ]

with s_i the min-SNR factor under --snr_gamma (else 1). No reference model, no KL: the short schedule and the small
learning rate keep the model close to the base. --loss dpo trains the baseline CRAFT is compared with, Diffusion-DPO
(Wallace et al., 2023), on crf_filter.py --mode pairs's folder: for each pair, preferred w and rejected l noised alike,

    L = mean_i [ -log sigmoid( -beta/2 * ((e_w - e_l) - (e_ref_w - e_ref_l)) ) ],   e = ||pred - target||^2 / (C H W)

with e_ref the frozen base's errors (the LoRAs switched off, or a frozen copy of the UNet for a full fine-tune).

The paper's SD1.5 recipe: full UNet, AdamW, lr 5e-5, batch 128 (e.g. --train_batch_size 8
--gradient_accumulation_steps 16), 120 steps; the text encoder and VAE stay frozen (--use_lora --train_text_encoder
gives the text encoder a LoRA too).

Output: a full pipeline folder (full fine-tune) or pytorch_lora_weights.safetensors (--use_lora; with
--output_kohya_format also a kohya file), training_config.json, validation grids and a model card.
"""

import argparse
import copy
import math
import statistics

import craft_checkpoints as ck
import craft_outputs as co
import craft_data as cd
import craft_training as ct
import craft_utils as cu

PIPELINE_CLASS = "StableDiffusionPipeline"  # the family this script trains: model_index.json's _class_name
BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # --pretrained_model_name_or_path when none is given
LICENSE = "creativeml-openrail-m"  # the model card's: SD1.5's, which a fine-tune inherits
MODEL_TAGS = ["stable-diffusion", "stable-diffusion-diffusers"]  # the model card's Hub tags for the family


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ct.add_training_args(parser, BASE_MODEL, resolution=512, beta_dpo=2500)
    ct.add_ddpm_args(parser)
    parser.add_argument("--use_lora", action="store_true", help="train a LoRA instead of the full UNet")
    parser.add_argument("--output_kohya_format", action="store_true",
                        help="with --use_lora: also write pytorch_lora_weights_kohya.safetensors (kohya's names, "
                             "for A1111/ComfyUI)")
    parser.add_argument("--train_text_encoder", action="store_true",
                        help="with --use_lora: a LoRA on the text encoder too (captions are then encoded every step)")
    parser.add_argument("--use_ema", action="store_true", help="full fine-tune: keep an EMA of the UNet weights")
    parser.add_argument("--ema_decay", type=float, default=0.9999,
                        help="the EMA's highest decay; diffusers' warm-up (1 + t) / (10 + t) keeps it near 0.93 over "
                             "120 steps, so only values below that change a CRAFT-length run")
    parser.add_argument("--fused_optimizer_step", action="store_true",
                        help="full fine-tune, one process: step Adam inside backward, a bucket of weights as soon as "
                             "its gradients are complete, and free them (no full gradient buffer; aimed at 8 GB "
                             "cards with --use_8bit_adam, not yet measured); needs --max_grad_norm 0 and "
                             "--gradient_accumulation_steps 1; not with fp16")
    args = ct.parse_training_args(parser, input_args)
    if args.use_ema and args.use_lora:
        parser.error("--use_ema applies to full fine-tuning, not --use_lora")
    if args.init_lora and not args.use_lora:
        parser.error("--init_lora starts a LoRA; a full fine-tune starts from --pretrained_model_name_or_path (give "
                     "the previous round's output folder there)")
    if args.output_kohya_format and not args.use_lora:
        parser.error("--output_kohya_format writes a LoRA in kohya's names; use it with --use_lora")
    if args.train_text_encoder and not args.use_lora:
        parser.error("--train_text_encoder adds a LoRA to the text encoder; use it with --use_lora")
    if args.fused_optimizer_step:  # each weight steps before the others' gradients exist
        if args.use_lora:
            parser.error("--fused_optimizer_step saves a full fine-tune's gradient buffer; a LoRA's is small: "
                         "leave it out with --use_lora")
        if args.max_grad_norm:
            parser.error("--fused_optimizer_step steps each weight before the gradient's global norm is known: add "
                         "--max_grad_norm 0 (no clipping)")
        if args.gradient_accumulation_steps != 1:
            parser.error("--fused_optimizer_step steps at every backward: use --gradient_accumulation_steps 1 and "
                         "a larger --train_batch_size")
    return args


def load_models(args):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"revision": args.revision}
    path = args.pretrained_model_name_or_path
    ct.check_model_family(path, args.revision, __file__, PIPELINE_CLASS)
    try:
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **common)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **common)
    except (OSError, ValueError) as error:
        cu.fail(f"could not load an SD1.5-style pipeline from {path} ({str(error).splitlines()[0]})")
    if unet.config.addition_embed_type == "text_time":
        cu.fail(f"{path} is an SDXL model; use train_craft_sdxl_lora.py")
    return scheduler, tokenizer, text_encoder, vae, unet


def main(args):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params, free_memory
    from peft import LoraConfig, inject_adapter_in_model
    from tqdm.auto import tqdm

    accelerator = ct.make_accelerator(args)
    if args.fused_optimizer_step and (accelerator.num_processes > 1 or accelerator.mixed_precision == "fp16"):
        cu.fail("--fused_optimizer_step runs on one process without fp16's loss scaling: use one GPU and bf16 or no "
                "mixed precision")
    torch.manual_seed(args.seed)  # LoRA's initial weights
    examples, weights_note = cd.load_examples(args)  # every bad row is refused before a model loads
    noise_scheduler, tokenizer, text_encoder, vae, unet = load_models(args)
    if args.prediction_type:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for frozen in (text_encoder, vae, unet):
        frozen.requires_grad_(False)
    weight_dtype = ct.weight_dtype_of(accelerator)

    # What trains: LoRAs on the UNet's attention (and the text encoder's), or the whole UNet.
    lora_alpha = args.lora_alpha or args.rank
    if args.use_lora:
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                    target_modules=args.lora_target_modules.split(",")))
        if args.train_text_encoder:
            # peft's own injection: transformers 5.2x's add_adapter asks for a peft (>= 0.22) not released yet
            inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), text_encoder)
    else:
        unet.requires_grad_(True)
    ema_unet = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                        model_config=unet.config) if args.use_ema else None
    trained = {"unet": unet, **({"text_encoder": text_encoder} if args.train_text_encoder else {})}

    def encode_images(pixels):
        """-> the VAE posterior's mean and std; the loop draws a new sample from it at every step."""
        dist = vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def encode_prompt(captions, text_encoder):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return {"prompt_embeds": text_encoder(ids.to(accelerator.device))[0]}

    def move_frozen(device):
        vae.to(device)
        if not args.train_text_encoder:
            text_encoder.to(device)
        free_memory()

    # CRAFT's sets are tiny: encode every image (both flips) and caption once, then free the VAE and the frozen text
    # encoder before the UNet arrives, for a lower peak. A text encoder that trains encodes the captions every step.
    vae.to(accelerator.device, weight_dtype)
    text_encoder.to(accelerator.device, weight_dtype)
    cache = cd.should_cache(args, examples)
    encodings = cd.Encodings(examples, args, encode_images,
                             None if args.train_text_encoder else lambda captions: encode_prompt(captions, text_encoder),
                             cache, show_progress=accelerator.is_local_main_process)
    if cache:
        move_frozen("cpu")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.activation_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    unet.to(accelerator.device, weight_dtype if args.use_lora else torch.float32)
    # Diffusion-DPO's reference: a LoRA's base is the UNet with its adapters off; a full fine-tune needs a frozen copy,
    # in the model's own precision (fp32 under autocast), so that the two agree exactly before the first step
    reference_unet = copy.deepcopy(unet).requires_grad_(False) if args.loss == "dpo" and not args.use_lora else None
    if args.init_lora:  # CRAFT in rounds: this round's LoRA starts where the previous round's ended
        ck.load_lora_into(StableDiffusionPipeline, trained, args.init_lora, f"--init_lora {args.init_lora}")
    cast_training_params(list(trained.values()), torch.float32)  # no "Attempting to unscale FP16 gradients"
    if ema_unet is not None:
        ema_unet.to(accelerator.device)

    params_to_optimize = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
    if args.fused_optimizer_step:  # Adam steps inside backward; `optimizer` is the stand-in the schedule drives
        step_in_backward = ct.StepInBackward(params_to_optimize, args, accelerator.num_processes)
        optimizer = step_in_backward.lead
    else:
        step_in_backward = None
        optimizer = ct.make_optimizer(params_to_optimize, args, accelerator.num_processes)
    train_dataset, train_dataloader = cd.make_dataloader(examples, args, cached=cache)
    num_update_steps_per_epoch = math.ceil(
        len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * num_update_steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    ck.register_checkpoint_hooks(accelerator, StableDiffusionPipeline, trained, args.use_lora, ema_unet,
                                step_in_backward)
    if args.train_text_encoder:
        unet, text_encoder, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, train_dataloader, lr_scheduler)
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, train_dataloader, lr_scheduler)
    models_to_train = [unet, text_encoder] if args.train_text_encoder else [unet]  # as prepared (DDP-wrapped)

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
        model = accelerator.unwrap_model(unet)
        if ema_unet is not None:  # validate the EMA weights, then put the training weights back
            ema_unet.store(model.parameters())
            ema_unet.copy_to(model.parameters())
        for module in trained.values():
            module.eval()
        pipeline = StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path, unet=model, vae=vae, text_encoder=accelerator.unwrap_model(text_encoder),
            tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            revision=args.revision, variant=args.variant).to(accelerator.device)
        co.log_validation(pipeline, args, accelerator, rewards, step)
        del pipeline
        if ema_unet is not None:
            ema_unet.restore(model.parameters())
        for module in trained.values():
            module.train()
        if cache:
            move_frozen("cpu")

    accelerator.print(
        f"{len(examples)} training {'pairs' if args.loss == 'dpo' else 'images'} ({weights_note}); "
        f"latents {'cached' if cache else 'encoded'}, text "
        + ("encoded each step (the text encoder trains)" if args.train_text_encoder else
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
                mean, std, _ = encodings.latent_dist(batch)
                latents = (mean + std * draws.randn(*mean.shape[1:]).to(mean.device)) * vae.config.scaling_factor
                copies = 1
                if args.loss == "dpo":  # each pair's rejected image goes after the batch's preferred ones
                    mean, std, _ = encodings.latent_dist(batch, rejected=True)
                    rejected = (mean + std * draws.randn(*mean.shape[1:]).to(mean.device)) * vae.config.scaling_factor
                    latents, copies = torch.cat([latents, rejected]), 2
                if args.train_text_encoder:
                    prompt_embeds = encode_prompt(captions, text_encoder)["prompt_embeds"]
                else:
                    prompt_embeds = encodings.text(captions)["prompt_embeds"]
                prompt_embeds = prompt_embeds.repeat(copies, 1, 1)

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
                model_pred = unet(noisy_latents.to(weight_dtype), timesteps,
                                  encoder_hidden_states=prompt_embeds.to(latents.device)).sample
                per_sample_loss = ct.per_sample_mse(model_pred, target)

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
                    # errors e of the model and of the frozen base on each pair's preferred (w) and rejected (l) image
                    with torch.no_grad(), accelerator.autocast(), \
                            ct.adapters_disabled(*(accelerator.unwrap_model(m) for m in models_to_train)):
                        if args.train_text_encoder:
                            prompt_embeds = encode_prompt(captions, text_encoder)["prompt_embeds"].repeat(2, 1, 1)
                        reference = accelerator.unwrap_model(unet) if reference_unet is None else reference_unet
                        reference_pred = reference(noisy_latents.to(weight_dtype), timesteps,
                                                   encoder_hidden_states=prompt_embeds.to(latents.device)).sample
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
            if ema_unet is not None:
                ema_unet.step(accelerator.unwrap_model(unet).parameters())
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
        unet = accelerator.unwrap_model(unet)
        if ema_unet is not None:
            ema_unet.copy_to(unet.parameters())
        with ck.written_whole(args.output_dir) as folder:
            if args.use_lora:
                lora_models = {name: accelerator.unwrap_model(module) for name, module in trained.items()}
                co.save_lora(StableDiffusionPipeline, folder, lora_models)
                if args.output_kohya_format:
                    co.save_kohya(folder, lora_models, lora_alpha, one_text_encoder=True)
            else:
                StableDiffusionPipeline.from_pretrained(
                    args.pretrained_model_name_or_path, unet=unet, vae=vae, text_encoder=text_encoder,
                    tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                    revision=args.revision, variant=args.variant).save_pretrained(folder)
        co.finish(args, stats, is_lora=args.use_lora, license=LICENSE, model_tags=MODEL_TAGS)
    accelerator.end_training()


if __name__ == "__main__":
    args = parse_args()
    with cu.write_faults_in_one_line(args.output_dir):
        main(args)
