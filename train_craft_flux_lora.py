#!/usr/bin/env python
"""CRAFT stage 7 for FLUX.1: advantage-weighted LoRA fine-tuning of a flow-matching transformer, QLoRA on a
consumer GPU. A fork of train_craft_sdxl_lora.py: only the model, the inputs, the noise draw and the target differ.

    accelerate launch train_craft_flux_lora.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
      --train_data_dir filtered --output_dir craft-flux-lora --mixed_precision bf16 --quantize_base nf4 \\
      --use_8bit_adam --gradient_checkpointing --rank 16 --resolution 1024

The forward process is flow matching: x_t = (1 - sigma) * x_0 + sigma * noise, the transformer predicts the
velocity, target = noise - x_0; sigma is drawn per sample (--weighting_scheme none = uniform, logit_normal, mode,
as diffusers' FLUX scripts name them). The CRAFT loss is unchanged in form:

    L = mean_i [ w_i * || v_theta(x_t, sigma_i, c_i) - (noise_i - x_0,i) ||^2 / (C H W) ]

with w_i the sample's CRF advantage. --loss dpo trains the Diffusion-DPO baseline on crf_filter.py --mode pairs's
folder, written for velocity prediction: for each pair, preferred w and rejected l with one noise and one sigma,

    L = mean_i [ -log sigmoid( -beta/2 * ((e_w - e_l) - (e_ref_w - e_ref_l)) ) ],   e = ||v - (noise - x_0)||^2 / (C H W)

with e_ref the base's errors (the LoRA switched off). Latents are packed 2x2 into tokens with image position ids;
the caption conditions through T5's hidden states (up to --max_sequence_length tokens) and CLIP's pooled embedding,
both cached once with the latents, after which the encoders and the VAE leave the GPU. FLUX.1-dev is guidance-
distilled: the guidance value (--guidance_scale) is an input of the transformer, not classifier-free guidance.

Output: pytorch_lora_weights.safetensors (FluxPipeline.load_lora_weights reads it; ComfyUI loads this diffusers
naming too), with --output_kohya_format also a kohya file (BFL's fused module names, for Forge and sd-scripts),
training_config.json, validation grids and a model card.
"""

import argparse
import math
import os
import statistics

import craft_checkpoints as ck
import craft_outputs as co
import craft_data as cd
import craft_training as ct
import craft_utils as cu

PIPELINE_CLASS = "FluxPipeline"  # the family this script trains: model_index.json's _class_name
BASE_MODEL = "black-forest-labs/FLUX.1-dev"  # --pretrained_model_name_or_path when none is given
LICENSE = "other"  # the model card's: FLUX.1-dev has a non-commercial licence of its own, which a fine-tune inherits
MODEL_TAGS = ["flux", "flux-diffusers"]  # the model card's Hub tags for the family

ATTENTION = "to_k,to_q,to_v,to_out.0,add_k_proj,add_q_proj,add_v_proj,to_add_out"  # double and single blocks
# kohya (sd-scripts, Forge) names FLUX.1's modules as BFL's checkpoint does, where q, k and v (and in the single
# blocks the MLP's input too) are one fused projection: kohya module -> the diffusers projections in it, in order
KOHYA_NAMES = {
    ("transformer_blocks", "double_blocks"): {
        "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
        "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "txt_attn_proj": ("attn.to_add_out",), "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
        "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
        "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",)},
    ("single_transformer_blocks", "single_blocks"): {
        "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
        "modulation_lin": ("norm.linear",)},
}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ct.add_training_args(parser, BASE_MODEL, resolution=1024, beta_dpo=5000)
    ct.add_flow_matching_args(parser)
    parser.add_argument("--guidance_scale", type=float, default=3.5,
                        help="the guidance embedding's value for guidance-distilled models (FLUX.1-dev)")
    parser.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens per caption (at most 512)")
    parser.add_argument("--output_kohya_format", action="store_true",
                        help="also write pytorch_lora_weights_kohya.safetensors under BFL's fused module names (Forge, "
                             "sd-scripts)")
    parser.set_defaults(learning_rate=1e-4, lora_target_modules=ATTENTION)
    args = ct.parse_training_args(parser, input_args)
    if not 1 <= args.max_sequence_length <= 512:
        parser.error("--max_sequence_length must be between 1 and 512")
    return args


def load_models(args, weight_dtype):
    """Everything but the transformer, which loads once these have encoded the training set and left the GPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    ct.check_model_family(path, revision, __file__, PIPELINE_CLASS)
    ct.check_quantize_base(args, weight_dtype)  # diffusers' own check that 4-bit loading works here
    try:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        tokenizers = (CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
                      T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", revision=revision))
        # frozen weights load in the training dtype: FLUX.1's transformer and T5-XXL are ~70 GB in fp32
        frozen = {"revision": revision, "variant": variant, "dtype": weight_dtype}
        encoders = (CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **frozen),
                    T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **frozen))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **frozen)
    except (OSError, ValueError) as error:
        cu.fail(f"could not load a FLUX pipeline from {path} ({str(error).splitlines()[0]})")
    return scheduler, tokenizers, encoders, vae


def load_transformer(args, weight_dtype, device):
    """The transformer on `device`: in the training dtype, or (--quantize_base nf4) quantized to 4 bits as it loads."""
    from diffusers import FluxTransformer2DModel

    quantization = ct.nf4_config(weight_dtype) if args.quantize_base else None
    try:
        transformer = FluxTransformer2DModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision, variant=args.variant,
            dtype=weight_dtype, quantization_config=quantization,
            **({"device_map": {"": str(device)}} if quantization else {}))
    except (OSError, ValueError) as error:
        cu.fail(f"could not load a FLUX transformer from {args.pretrained_model_name_or_path} "
                f"({str(error).splitlines()[0]})")
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


def kohya_state_dict(transformer, scale):
    """The LoRA under kohya's FLUX.1 names (ComfyUI reads both namings). A fused module's LoRA stacks its parts'
    down-projections and places their up-projections block-diagonally, zeros for a part not trained; its alpha
    keeps alpha / rank = `scale`, so up @ down * alpha / rank is exactly the parts' LoRA deltas stacked."""
    import torch
    from peft import get_peft_model_state_dict

    lora = get_peft_model_state_dict(transformer)
    kohya, named = {}, set()
    for (block, kohya_block), modules in KOHYA_NAMES.items():
        for i in range(len(getattr(transformer, block))):
            for name, parts in modules.items():
                paths = [f"{block}.{i}.{part}" for part in parts]
                trained = [path for path in paths if f"{path}.lora_A.weight" in lora]
                if not trained:
                    continue
                down = torch.cat([lora[f"{path}.lora_A.weight"] for path in trained])
                up = down.new_zeros(sum(transformer.get_submodule(path).out_features for path in paths), len(down))
                row = column = 0
                for path in paths:
                    rows = transformer.get_submodule(path).out_features
                    if path in trained:
                        part_up = lora[f"{path}.lora_B.weight"]
                        up[row:row + rows, column:column + part_up.shape[1]] = part_up
                        column += part_up.shape[1]
                    row += rows
                key = f"lora_unet_{kohya_block}_{i}_{name}"
                kohya.update({f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up,
                              f"{key}.alpha": torch.tensor(scale * len(down))})
                named.update(trained)
    unnamed = sorted({key.rsplit(".lora_", 1)[0] for key in lora} - named)
    if unnamed:
        cu.fail(f"--output_kohya_format: kohya has no FLUX.1 name for the LoRA on {unnamed[0]} (from "
                f"--lora_target_modules); leave that module out or the flag off")
    return kohya


def main(args):
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, free_memory
    from peft import LoraConfig
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    accelerator = ct.make_accelerator(args)
    torch.manual_seed(args.seed)  # LoRA's initial weights
    examples, weights_note = cd.load_examples(args)  # every bad row is refused before a model loads
    weight_dtype = ct.weight_dtype_of(accelerator)
    noise_scheduler, (tokenizer, tokenizer_2), (text_encoder, text_encoder_2), vae = load_models(args, weight_dtype)
    for frozen in (text_encoder, text_encoder_2, vae):
        frozen.requires_grad_(False)
    packing = 2 * 2 ** (len(vae.config.block_out_channels) - 1)  # VAE downsampling x the 2x2 token packing
    if args.resolution % packing:
        cu.fail(f"--resolution {args.resolution} must be a multiple of {packing} for this model (VAE x 2x2 packing)")
    # What trains: a LoRA on the attention projections of the double- and single-stream blocks.
    lora_alpha = args.lora_alpha or args.rank
    lora_config = {"r": args.rank, "lora_alpha": lora_alpha, "init_lora_weights": "gaussian",
                   "target_modules": args.lora_target_modules.split(",")}
    if args.output_kohya_format:  # a module kohya cannot name is refused now, from the transformer's shape alone
        with torch.device("meta"):
            shape = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(
                args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision))
        shape.add_adapter(LoraConfig(**lora_config))
        kohya_state_dict(shape, lora_alpha / args.rank)

    def encode_images(pixels):
        """-> the VAE posterior's mean and std; the loop draws a new sample from it at every step."""
        dist = vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def encode_prompt(captions):
        """T5's last hidden states (the tokens the transformer attends to) and CLIP's pooled embedding."""
        clip_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        t5_ids = tokenizer_2(captions, padding="max_length", max_length=args.max_sequence_length, truncation=True,
                             return_tensors="pt").input_ids
        return {"prompt_embeds": text_encoder_2(t5_ids.to(accelerator.device))[0],
                "pooled_prompt_embeds": text_encoder(clip_ids.to(accelerator.device)).pooler_output}

    def move_frozen(device, modules=(vae, text_encoder, text_encoder_2)):
        for module in modules:
            module.to(device)
        free_memory()

    for module in (vae, text_encoder, text_encoder_2):
        module.to(accelerator.device)
    # CRAFT's sets are tiny: encode every image (both flips) and caption once, then free the VAE and both text
    # encoders (T5-XXL alone is 9.5 GB in bf16) before the transformer loads, so they never share the GPU (unless
    # --cache_latents no keeps them there to encode every step).
    cache = cd.should_cache(args, examples)
    encodings = cd.Encodings(examples, args, encode_images, encode_prompt, cache,
                             show_progress=accelerator.is_local_main_process)
    with torch.no_grad():  # validation prompts too: the text encoders never come back to the GPU
        validation_inputs = {prompt: {name: value.cpu() for name, value in encode_prompt([prompt]).items()}
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
        ck.load_lora_into(FluxPipeline, trained, args.init_lora, f"--init_lora {args.init_lora}")
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
    ck.register_checkpoint_hooks(accelerator, FluxPipeline, trained, is_lora=True)
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
        pipeline = FluxPipeline.from_pretrained(
            args.pretrained_model_name_or_path, transformer=accelerator.unwrap_model(transformer), vae=vae,
            text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, revision=args.revision,
            variant=args.variant).to(accelerator.device)
        inputs = {prompt: {name: value.to(accelerator.device, weight_dtype) for name, value in embeds.items()}
                  for prompt, embeds in validation_inputs.items()}
        co.log_validation(pipeline, args, accelerator, rewards, step, inputs, height=args.resolution,
                          width=args.resolution, guidance_scale=args.guidance_scale)
        del pipeline
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
    guidance_embeds = accelerator.unwrap_model(transformer).config.guidance_embeds
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
                batch_size, channels, height, width = latents.shape

                # flow matching: noise, a sigma per sample from --weighting_scheme (a pair's images share both), the
                # straight path between them
                noise = draws.randn(*latents.shape[1:]).to(latents.device).repeat(copies, 1, 1, 1)
                positions = (draw_sigma_positions(draws, args) * noise_scheduler.config.num_train_timesteps).long()
                positions = positions.clamp(max=noise_scheduler.config.num_train_timesteps - 1)  # 'mode' reaches u = 1
                positions = positions.repeat(copies)
                timesteps = noise_scheduler.timesteps[positions].to(latents.device)
                sigmas = noise_scheduler.sigmas[positions].to(latents.device).view(-1, 1, 1, 1)
                noisy_latents = (1 - sigmas) * latents + sigmas * noise
                target = FluxPipeline._pack_latents(noise - latents, batch_size, channels, height, width)

                # the transformer's inputs: 2x2 patches as tokens, their (row, column) ids, the text tokens' ids (0)
                packed = FluxPipeline._pack_latents(noisy_latents, batch_size, channels, height, width)
                image_ids = FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2,
                                                                   latents.device, weight_dtype)
                prompt_embeds = text["prompt_embeds"].to(latents.device, weight_dtype)
                text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=weight_dtype)
                guidance = torch.full((batch_size,), args.guidance_scale, device=latents.device) \
                    if guidance_embeds else None

                def predict(transformer):
                    return transformer(hidden_states=packed.to(weight_dtype), timestep=timesteps / 1000,
                                       guidance=guidance, encoder_hidden_states=prompt_embeds,
                                       pooled_projections=text["pooled_prompt_embeds"].to(latents.device, weight_dtype),
                                       txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]

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
            co.save_lora(FluxPipeline, folder, {"transformer": accelerator.unwrap_model(transformer)})
            if args.output_kohya_format:
                save_file(kohya_state_dict(accelerator.unwrap_model(transformer), lora_alpha / args.rank),
                          os.path.join(folder, co.KOHYA_FILE))
        co.finish(args, stats, is_lora=True, license=LICENSE, model_tags=MODEL_TAGS)
    accelerator.end_training()


if __name__ == "__main__":
    args = parse_args()
    with cu.write_faults_in_one_line(args.output_dir):
        main(args)
