"""A trainer's output folder while it runs: held by one run at a time, a record of what the pack wrote there (the
only files --overwrite_output_dir replaces), checkpoints in diffusers' formats that load nothing able to run code,
exact resume under the run's own settings, and final weights that are moved in only once whole."""

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil

import craft_outputs as co
import craft_rewards as cr
import craft_utils as cu


# ----------------------------------------------------------------------------------------------------------------
# The output folder: one run at a time, and only what the pack wrote there is ever replaced

WRITTEN = ".craft_written.json"  # the names this pack wrote in output_dir, recorded before each is written


def written_here(output_dir):
    """The names in output_dir that this pack wrote. A folder of an earlier version of the pack has no record: there
    its training_config.json vouches for what its trainers write (checkpoints, logs, validation, the final files)."""
    record = os.path.join(output_dir, WRITTEN)
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as f:
            return set(json.load(f))
    try:
        with open(os.path.join(output_dir, "training_config.json"), encoding="utf-8") as f:
            recorded_args = json.load(f)["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    names = {recorded_args.get("logging_dir"), "validation", "README.md", "training_config.json", co.LORA_FILE,
             co.KOHYA_FILE, "model_index.json"}
    if os.path.isfile(os.path.join(output_dir, "model_index.json")):  # a full fine-tune's pipeline folders
        with open(os.path.join(output_dir, "model_index.json"), encoding="utf-8") as f:
            names |= {name for name in json.load(f) if not name.startswith("_")}
    return names | {name for name in os.listdir(output_dir) if CHECKPOINT_NAME.match(name)}


def record_written(output_dir, names):
    """Add `names` to output_dir's record (main process), before they are written."""
    cu.write_json_atomic(os.path.join(output_dir, WRITTEN), sorted(written_here(output_dir) | set(names)))


def check_output_dir(args):
    """While the arguments are parsed (nothing is written): --overwrite_output_dir refuses a folder holding anything
    the pack did not write; without it, a folder holding results is refused unless the run resumes."""
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        cu.fail(f"--output_dir {args.output_dir} is a file; give a folder")
    if not os.path.isdir(args.output_dir):
        return
    entries = [name for name in os.listdir(args.output_dir) if not name.startswith(".")]
    if args.overwrite_output_dir and not args.resume_from_checkpoint:
        cu.refuse_foreign_entries(args.output_dir, written_here(args.output_dir).__contains__, "--overwrite_output_dir")
        return
    # what a run writes before its first checkpoint (logs, validation grids) is no result; saved final weights are
    logs = os.path.normpath(args.logging_dir).split(os.sep)[0]  # a nested --logging_dir: its top folder
    results = [name for name in entries if name not in (logs, "validation")] + \
        [FINAL_READY] * os.path.isdir(os.path.join(args.output_dir, FINAL_READY))
    if results and not args.overwrite_output_dir:
        if args.resume_from_checkpoint is None:
            cu.fail(f"{args.output_dir} is not empty; pass --overwrite_output_dir, --resume_from_checkpoint latest, "
                    "or choose another --output_dir")
        if args.resume_from_checkpoint == "latest" and not checkpoints(args.output_dir):
            cu.fail(f"{args.output_dir} is not empty and holds no checkpoint-* to resume from; pass "
                    "--overwrite_output_dir to train anew over it, or choose another --output_dir")


def claim_output_dir(accelerator, args):
    """Once the models are loaded, before anything is written: output_dir is created and held for this run (a second
    run into it stops in one line), final weights that an interrupted save left are moved in, and with
    --overwrite_output_dir the previous run's files (checked by check_output_dir) are deleted."""
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        cu.claim_folder(args.output_dir)
        finish_final_save(args.output_dir)
        logs = os.path.normpath(args.logging_dir).split(os.sep)[0]
        in_progress = {logs, "validation", "README.md", "training_config.json"}  # written as the run goes
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            # what this run checked was the pack's: another run's states must not be resumed into this one
            for name in written_here(args.output_dir) & set(os.listdir(args.output_dir)):
                path = os.path.join(args.output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            cu.write_json_atomic(os.path.join(args.output_dir, WRITTEN), [])
        entries = set(os.listdir(args.output_dir))
        record_written(args.output_dir, {name for name in in_progress
                                         if name in written_here(args.output_dir) or name not in entries})
    accelerator.wait_for_everyone()


FINAL_READY = ".final.ready"  # the final weights, completely saved, on their way into output_dir


@contextlib.contextmanager
def written_whole(output_dir):
    """Yields a hidden folder to save the final weights into; once complete, its files move into output_dir (a
    rerun finishes the moves that a kill interrupted), so a half-written weights file never has its real name."""
    partial = os.path.join(output_dir, ".final.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    yield partial
    cu.fault_point("final_weights_written")
    record_written(output_dir, os.listdir(partial))
    os.replace(partial, os.path.join(output_dir, FINAL_READY))
    cu.move_entries_in(os.path.join(output_dir, FINAL_READY), output_dir)


def finish_final_save(output_dir):
    """Move in the final weights that a run had completely saved when a kill stopped their moving in."""
    if os.path.isdir(os.path.join(output_dir, FINAL_READY)):
        cu.move_entries_in(os.path.join(output_dir, FINAL_READY), output_dir)
        print(f"{output_dir}: moved in the final weights that an interrupted run had saved")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and exact resume


OPTIMIZER_IN_BACKWARD = "optimizer_in_backward.bin"


def register_checkpoint_hooks(accelerator, pipeline_class, models, is_lora, ema=None, step_in_backward=None):
    """Checkpoints hold the trainable weights in diffusers' own formats (a LoRA file, or the denoiser's folder)
    instead of a pickle, and every other state loads with torch.load(weights_only=True): a checkpoint someone else
    made cannot run code. `models`: name -> trained module, the denoiser first (unet or transformer);
    `step_in_backward`: a ct.StepInBackward, whose Adam states are saved here (accelerate would unpickle them with
    weights_only=False)."""
    import torch

    denoiser_name = next(iter(models))
    names = {id(module): name for name, module in models.items()}

    def unwrapped(modules):
        return {names[id(accelerator.unwrap_model(m))]: accelerator.unwrap_model(m) for m in modules}

    def save(modules, weights, folder):
        if accelerator.is_main_process:
            trained = unwrapped(modules)
            if is_lora:
                co.save_lora(pipeline_class, folder, trained)
            else:
                trained[denoiser_name].save_pretrained(os.path.join(folder, denoiser_name))
            if ema is not None:
                ema.save_pretrained(os.path.join(folder, f"{denoiser_name}_ema"))
            if step_in_backward is not None:
                torch.save(step_in_backward.state_dict(), os.path.join(folder, OPTIMIZER_IN_BACKWARD))
        weights.clear()  # accelerate would pickle them too

    def load(modules, folder):
        from diffusers.training_utils import EMAModel

        trained = unwrapped(modules)
        modules.clear()  # loaded here, not by accelerate
        denoiser = trained[denoiser_name]
        if is_lora:
            load_lora_into(pipeline_class, trained, folder, f"--resume_from_checkpoint {folder}")
        else:
            saved = type(denoiser).from_pretrained(folder, subfolder=denoiser_name)
            denoiser.load_state_dict(saved.state_dict())
        if ema is not None:
            ema.load_state_dict(EMAModel.from_pretrained(os.path.join(folder, f"{denoiser_name}_ema"),
                                                         type(denoiser)).state_dict())
            ema.to(accelerator.device)  # loaded on the CPU
        if step_in_backward is not None:
            saved = os.path.join(folder, OPTIMIZER_IN_BACKWARD)
            if not os.path.exists(saved):  # where accelerate's register_for_checkpointing put it
                saved = os.path.join(folder, "custom_checkpoint_0.pkl")
            step_in_backward.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def load_lora_into(pipeline_class, trained, path, where):
    """Set the LoRAs being trained (`trained`: name -> module, the denoiser first) from a LoRA file or folder in
    `pipeline_class`'s format, in fp32; a LoRA on other modules or of another rank is refused in one line (`where`:
    the flag and path that named it)."""
    import torch
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    folder, weight_name = (path, None) if os.path.isdir(path) else os.path.split(path)
    try:
        state = pipeline_class.lora_state_dict(folder, weight_name=weight_name)
    except (OSError, ValueError) as error:
        cu.fail(f"{where}: not a LoRA file of {pipeline_class.__name__} ({str(error).splitlines()[0][:200]})")
    state = state[0] if isinstance(state, tuple) else state  # SD/SDXL return (state, alphas), SD3/FLUX a dict
    denoiser_name, denoiser = next(iter(trained.items()))
    own = convert_unet_state_dict_to_peft({k[len(denoiser_name) + 1:]: v for k, v in state.items()
                                           if k.startswith(f"{denoiser_name}.")})
    expected = set(get_peft_model_state_dict(denoiser))
    encoders = {key.split(".", 1)[0] for key in state if not key.startswith(f"{denoiser_name}.")}
    if set(own) != expected or encoders != set(list(trained)[1:]):
        cu.fail(f"{where}: its LoRA is on other modules than this run's ({len(own)} {denoiser_name} weights, "
                f"{len(expected)} expected; text encoders: {sorted(encoders) or 'none'}, this run: "
                f"{list(trained)[1:] or 'none'}); train with the flags that made it (--lora_target_modules, "
                "--train_text_encoder)")
    try:
        set_peft_model_state_dict(denoiser, own, adapter_name="default")
        for name, module in list(trained.items())[1:]:
            _set_state_dict_into_text_encoder(state, prefix=f"{name}.", text_encoder=module)
    except (RuntimeError, ValueError) as error:  # shapes: another rank
        detail = " ".join(str(error).split())[:200]
        cu.fail(f"{where}: its LoRA does not fit this run's ({detail}); give the --rank it was trained with")
    for parameter in (p for module in trained.values() for p in module.parameters() if p.requires_grad):
        parameter.data = parameter.data.to(torch.float32)


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)$")


def checkpoints(output_dir):
    """The checkpoint-N folders in output_dir as (N, path), oldest first."""
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := CHECKPOINT_NAME.match(name))] if os.path.isdir(output_dir) else []
    return sorted(found)


def find_checkpoint(args):
    """'latest' -> (step, newest checkpoint-N in output_dir), or None if there is none; else the named folder."""
    if args.resume_from_checkpoint == "latest":
        found = checkpoints(args.output_dir)
        return found[-1] if found else None
    for path in (args.resume_from_checkpoint, os.path.join(args.output_dir, args.resume_from_checkpoint)):
        if os.path.isdir(path):
            match = CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(path)))
            if not match:
                cu.fail(f"--resume_from_checkpoint {path}: not a checkpoint-N folder of this trainer")
            return int(match.group(1)), path
    cu.fail(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder (absolute, or in {args.output_dir})")


def resume(accelerator, args):
    """Clear what killed runs left, then --resume_from_checkpoint: load the saved state; -> the optimizer steps it
    had done (0 for a new run). With the seeded order and per-sample seeds the run continues exactly as if it had
    never stopped."""
    if accelerator.is_main_process:
        remove_partial_checkpoints(args.output_dir)
    accelerator.wait_for_everyone()
    if not args.resume_from_checkpoint:
        return 0
    found = find_checkpoint(args)
    if found is None:  # 'latest' in an empty or new folder: a preemptible job's first start
        accelerator.print(f"no checkpoint in {args.output_dir}: starting a new run")
        return 0
    step, checkpoint = found
    check_run_settings(checkpoint, step, run_settings(accelerator, args), args.max_train_steps)
    from accelerate.utils import load as accelerate_load

    try:
        # accelerate loads these with weights_only=True too, but skips them silently when that refuses them
        accelerate_load(os.path.join(checkpoint, f"random_states_{accelerator.process_index}.pkl"))
        accelerator.load_state(checkpoint)
    except pickle.UnpicklingError as error:
        cu.fail(f"{checkpoint} holds a file that is not plain weights and states ({str(error).splitlines()[0][:200]}); "
                "it was not made by this script or has been tampered with: do not resume from it")
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        cu.fail(f"cannot resume from {checkpoint} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); it "
                "must be a checkpoint of this script, saved with the same model and the same flags for what trains "
                "(LoRA or full weights, text encoders, optimizer)")
    accelerator.print(f"resumed from {checkpoint} at step {step}")
    return step


RUN_SETTINGS = "run_settings.json"
# Flags that only say how a run is watched, saved, reported or made to fit memory: a resume may change these. Any
# other flag defines the run, and a resume under another value would go on under the checkpoint's state.
CHANGEABLE_ON_RESUME = {
    "output_dir", "logging_dir", "report_to", "resume_from_checkpoint", "overwrite_output_dir", "config",
    "train_data_dir", "init_lora",  # the data by its metadata's hash (the folder may move); the state by the checkpoint
    "checkpointing_steps", "checkpoints_total_limit", "max_train_steps", "num_train_epochs", "push_to_hub",
    "hub_model_id", "hub_token", "output_kohya_format", "dataloader_num_workers", "image_decode_workers",
    "cache_latents", "gradient_checkpointing", "enable_xformers_memory_efficient_attention", "allow_tf32",
    "num_validation_images", "validation_prompt", "validation_steps", "validation_epochs", "validation_rewards",
    "validation_inference_steps", "validation_guidance_scale", "validation_model_name_or_path",
}


def run_settings(accelerator, args):
    """The settings that define a run, as recorded in each checkpoint: every flag not in CHANGEABLE_ON_RESUME
    (local paths made absolute), the number of processes, and the training set's metadata file's hash."""
    reward_parser = argparse.ArgumentParser()
    cr.add_reward_args(reward_parser)  # the weights of --validation_rewards
    reward_flags = {action.dest for action in reward_parser._actions}
    settings = {}
    for name, value in sorted(vars(args).items()):
        if name in CHANGEABLE_ON_RESUME or name in reward_flags or name == "validation_reward_names":
            continue
        settings[name] = os.path.abspath(value) if isinstance(value, str) and os.path.exists(value) else value
    settings["num_processes"] = accelerator.num_processes
    settings["mixed_precision"] = accelerator.mixed_precision  # the flag's None means the accelerate config's
    metadata = os.path.join(args.train_data_dir or "", cu.METADATA)
    if args.train_data_dir and os.path.isfile(metadata):
        with open(metadata, "rb") as f:
            settings["train_metadata_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return settings


def check_run_settings(checkpoint, step, settings, max_train_steps):
    """Refuse, in one line naming the setting, a resume whose run-defining settings differ from the checkpoint's,
    or whose --max_train_steps is below the checkpoint's step."""
    if max_train_steps is not None and max_train_steps < step:
        cu.fail(f"--max_train_steps {max_train_steps} is below the step of {checkpoint} ({step}); give at least {step}, "
                "or resume from an earlier checkpoint-N")
    path = os.path.join(checkpoint, RUN_SETTINGS)
    if not os.path.isfile(path):
        print(f"{checkpoint} records no run settings (an earlier version of the pack saved it): resuming without "
              "checking them")
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    for name in sorted(set(saved) | set(settings)):
        if saved.get(name) != settings.get(name):
            flag = name if name in ("num_processes", "train_metadata_sha256") else f"--{name}"
            cu.fail(f"{checkpoint} was trained with {flag} {saved.get(name)!r} and this run gives {settings.get(name)!r}"
                    f"; resume with the checkpoint's value, or train anew: drop --resume_from_checkpoint and pass "
                    "--overwrite_output_dir (or another --output_dir)")


def save_checkpoint(accelerator, args, step):
    """checkpoint-N in output_dir, saved as a hidden folder and swapped in when complete (a kill mid-save leaves the
    earlier checkpoints whole); then, with --checkpoints_total_limit, the oldest go."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    partial = os.path.join(args.output_dir, f".checkpoint-{step}.partial")
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    if accelerator.is_main_process:
        cu.write_json_atomic(os.path.join(partial, RUN_SETTINGS), run_settings(accelerator, args))
    accelerator.wait_for_everyone()  # every process's random state is in
    cu.fault_point("checkpoint_written")
    if accelerator.is_main_process:
        record_written(args.output_dir, {f"checkpoint-{step}"})
        cu.publish_folder(partial, final)  # replaces the same step saved by an earlier run, if any
        if args.checkpoints_total_limit is not None:
            for _, path in checkpoints(args.output_dir)[: -args.checkpoints_total_limit or None]:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()


def remove_partial_checkpoints(output_dir):
    """Complete the checkpoint swaps that kills interrupted, then delete the half-saved checkpoints and final
    weights they left (main process, before training)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        swap = re.match(r"\.(checkpoint-\d+)\.(new|old)$", name)
        if swap:
            cu.recover_folder(os.path.join(output_dir, swap.group(1)))
    for name in os.listdir(output_dir):
        if re.match(r"\.checkpoint-\d+\.partial$", name) or name == ".final.partial":
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
