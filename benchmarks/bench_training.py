#!/usr/bin/env python
"""Training step time and peak memory of the CRAFT trainers, with ratios against baselines run in the same call.

Each configuration is one run of the real trainer script in a fresh process (so peak memory is its own), on the
same small training set; the trainer records seconds per step (first step excluded) and peak memory (GPU
allocation, or the process's peak RSS on a CPU) in training_config.json.

  SD1.5 full fine-tune:  ours (cached latents + text) vs encoding every step; 8-bit vs 32-bit AdamW; Adam stepped
                         inside backward (--fused_optimizer_step, no gradient buffer) vs the normal step, both
                         without clipping (the fused step refuses it)
  SD1.5 LoRA r16:        cached, AdamW (its optimizer state is a few MB, so 8-bit Adam changes nothing)
  SDXL LoRA:             ours (cached latents + both encoders' embeddings, VAE/encoders off the GPU) vs the
                         diffusers way (VAE and both text encoders run every step)
  FLUX.1 LoRA r16:       the NF4-quantized base (QLoRA, --quantize_base nf4; GPU only) vs the bf16 base
  Z-Image, FLUX.2 [klein] 4B LoRA r16: the same pair

    python benchmarks/bench_training.py --zoo /tmp/zoo                 # tiny models, CPU
    python benchmarks/bench_training.py --real_size                    # GPU: real architectures, random weights
    python benchmarks/bench_training.py --real_size --configs "sd15 LoRA"   # only the configurations named so
    python benchmarks/bench_training.py --zoo /tmp/zoo --compare_to_commit 5cc3e41 --repeats 3

--compare_to_commit runs every configuration also with the trainers of an earlier commit (extracted with
`git archive`), alternating old and new runs --repeats times, and prints the step-time ratio (median of the
repeats) and the largest difference between the weights the two versions trained (0 when both draw the same random
numbers in the same order; a change of the draws, as per-sample seeds were, makes it the size of a run-to-run
difference).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.join(REPO, "tools"))


def write_real_size_pipelines(folder, kinds):
    import torch

    from make_tiny_models import make_clip_tokenizer, make_qwen_tokenizer, make_t5_tokenizer
    from real_size_models import real_size_flux, real_size_flux2_klein, real_size_pipeline, real_size_zimage

    tokenizer = make_clip_tokenizer(os.path.join(folder, "tokenizer"))  # padded to 77 tokens like the real one
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = {}
    kinds_and_dtypes = (("sd15", torch.float32), ("sdxl", torch.bfloat16), ("flux", torch.bfloat16),
                        ("zimage", torch.bfloat16), ("flux2_klein", torch.bfloat16))
    for kind, dtype in kinds_and_dtypes:
        if kind not in kinds:  # SD1.5 fine-tunes fp32 weights
            continue
        if kind == "flux":  # ~34 GB on disk in bf16
            pipe = real_size_flux(tokenizer, make_t5_tokenizer(os.path.join(folder, "t5_tokenizer")), device, dtype)
        elif kind in ("zimage", "flux2_klein"):  # ~21 and ~16 GB on disk in bf16
            build = real_size_zimage if kind == "zimage" else real_size_flux2_klein
            pipe = build(make_qwen_tokenizer(os.path.join(folder, "qwen_tokenizer")), device, dtype)
        else:
            pipe = real_size_pipeline(kind, tokenizer, device, dtype)
        paths[kind] = os.path.join(folder, kind)
        pipe.save_pretrained(paths[kind])
        del pipe
        torch.cuda.empty_cache()
    return paths


def run(script, model, data, out, flags):
    command = [sys.executable, os.path.join(REPO, script), "--pretrained_model_name_or_path", model,
               "--train_data_dir", data, "--output_dir", out, "--report_to", "none", "--checkpointing_steps", "100000",
               *map(str, flags)]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode != 0:
        raise SystemExit(f"{script} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "training_config.json")) as f:
        return json.load(f)["data"]


def extract_commit(commit, folder):
    """The trainers and helpers as they were at `commit`, in `folder`."""
    archive = subprocess.run(["git", "-C", REPO, "archive", commit], capture_output=True, check=True).stdout
    os.makedirs(folder)
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def trained_weights(out):
    """The trained tensors of an output folder: the LoRA file, else the fine-tuned UNet."""
    from safetensors.torch import load_file

    lora = os.path.join(out, "pytorch_lora_weights.safetensors")
    return load_file(lora) if os.path.isfile(lora) else \
        load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


def max_difference(a, b):
    if a.keys() != b.keys():
        return float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", help="the tiny zoo (tools/make_tiny_models.py), for the tiny runs")
    parser.add_argument("--real_size", action="store_true",
                        help="real SD1.5/SDXL/FLUX.1/Z-Image/FLUX.2 [klein] architectures, random weights")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", help="comma-separated prefixes: run only the configurations they start")
    parser.add_argument("--compare_to_commit", help="also run the trainers of this git commit (the baseline)")
    parser.add_argument("--repeats", type=int, default=1, help="with --compare_to_commit: runs of each version")
    args = parser.parse_args(argv)
    if not (args.zoo or args.real_size):
        parser.error("--zoo is needed without --real_size")
    return args


def configurations(real_size):
    """name -> (script, model kind, flags)."""
    if real_size:
        sd15 = ["--resolution", 512, "--train_batch_size", 1, "--mixed_precision", "bf16", "--gradient_checkpointing"]
        sdxl = ["--resolution", 1024, "--train_batch_size", 1, "--mixed_precision", "bf16", "--gradient_checkpointing",
                "--use_8bit_adam", "--rank", 16]
        flux = sdxl + ["--max_sequence_length", 512]
        qwen = sdxl + ["--max_sequence_length", 512]
        klein = qwen
    else:
        sd15 = ["--resolution", 64, "--train_batch_size", 2]
        sdxl = ["--resolution", 64, "--train_batch_size", 2, "--use_8bit_adam"]
        flux = sdxl + ["--max_sequence_length", 16]
        qwen = ["--resolution", 32, "--train_batch_size", 2, "--use_8bit_adam", "--max_sequence_length", 32]
        klein = qwen[:1] + [16] + qwen[2:]  # the tiny klein's VAE does not downsample
    return {
        "sd15 full, cached, 8-bit Adam": ("train_craft_sd15.py", "sd15", sd15 + ["--use_8bit_adam"]),
        "sd15 full, encoded each step, 8-bit Adam": ("train_craft_sd15.py", "sd15",
                                                     sd15 + ["--use_8bit_adam", "--cache_latents", "no"]),
        "sd15 full, cached, 32-bit AdamW": ("train_craft_sd15.py", "sd15", sd15),
        "sd15 full, cached, 8-bit Adam, no clipping": ("train_craft_sd15.py", "sd15", sd15 + [
            "--use_8bit_adam", "--max_grad_norm", 0]),
        "sd15 full, cached, 8-bit Adam, fused step": ("train_craft_sd15.py", "sd15", sd15 + [
            "--use_8bit_adam", "--fused_optimizer_step", "--max_grad_norm", 0]),
        "sd15 LoRA r16, cached, AdamW": ("train_craft_sd15.py", "sd15",
                                              sd15 + ["--use_lora", "--rank", 16]),
        "sdxl LoRA, cached (ours)": ("train_craft_sdxl_lora.py", "sdxl", sdxl),
        "sdxl LoRA, encoded each step (diffusers way)": ("train_craft_sdxl_lora.py", "sdxl",
                                                         sdxl + ["--cache_latents", "no"]),
        "flux LoRA, nf4 base (QLoRA)": ("train_craft_flux_lora.py", "flux", flux + ["--quantize_base", "nf4"]),
        "flux LoRA, bf16 base": ("train_craft_flux_lora.py", "flux", flux),
        "zimage LoRA, nf4 base (QLoRA)": ("train_craft_zimage_lora.py", "zimage", qwen + ["--quantize_base", "nf4"]),
        "zimage LoRA, bf16 base": ("train_craft_zimage_lora.py", "zimage", qwen),
        "klein LoRA, nf4 base (QLoRA)": ("train_craft_flux2_klein_lora.py", "flux2_klein",
                                         klein + ["--quantize_base", "nf4"]),
        "klein LoRA, bf16 base": ("train_craft_flux2_klein_lora.py", "flux2_klein", klein),
    }


def main():
    from make_tiny_models import make_training_set  # coloured squares with CRAFT weights

    args = parse_args()
    configs = configurations(args.real_size)
    if args.configs:
        prefixes = tuple(args.configs.split(","))
        unknown = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in configs)]
        if unknown:
            raise SystemExit(f"--configs: no configuration starts with {unknown[0]!r}; they are: {'; '.join(configs)}")
        configs = {name: c for name, c in configs.items() if name.startswith(prefixes)}
    import torch

    if not torch.cuda.is_available():  # diffusers quantizes on GPUs only
        configs = {name: c for name, c in configs.items() if "--quantize_base" not in c[2]}
    work = tempfile.mkdtemp()
    data = make_training_set(__import__("pathlib").Path(work) / "data", n=8)
    if args.real_size:
        models = write_real_size_pipelines(work, {kind for _, kind, _ in configs.values()})
    else:
        models = {kind: os.path.join(args.zoo, kind) for kind in ("sd15", "sdxl", "flux", "zimage", "flux2_klein")}
    if args.compare_to_commit:
        compare(args, configs, models, str(data), work)
        return
    results = {}
    for name, (script, kind, flags) in configs.items():
        results[name] = run(script, models[kind], str(data), os.path.join(work, name.replace(" ", "_")),
                            flags + ["--max_train_steps", args.steps])
        r = results[name]
        print(f"{name:48s} {r['seconds_per_step']:8.3f} s/step  {r['memory']}", flush=True)

    def ratio(a, b, key):
        return results[b][key] / results[a][key]

    pairs = [(ours, baseline) for ours, baseline in (
        ("sd15 full, cached, 8-bit Adam", "sd15 full, encoded each step, 8-bit Adam"),
        ("sd15 full, cached, 8-bit Adam", "sd15 full, cached, 32-bit AdamW"),
        ("sd15 full, cached, 8-bit Adam, fused step", "sd15 full, cached, 8-bit Adam, no clipping"),
        ("sdxl LoRA, cached (ours)", "sdxl LoRA, encoded each step (diffusers way)"),
        ("flux LoRA, nf4 base (QLoRA)", "flux LoRA, bf16 base"),
        ("zimage LoRA, nf4 base (QLoRA)", "zimage LoRA, bf16 base"),
        ("klein LoRA, nf4 base (QLoRA)", "klein LoRA, bf16 base"))
        if {ours, baseline} <= set(results)]
    if pairs:
        print("ratios (baseline / ours):")
    for ours, baseline in pairs:
        print(f"  {baseline} vs {ours}: step time {ratio(ours, baseline, 'seconds_per_step'):.2f}x, "
              f"peak memory {ratio(ours, baseline, 'peak_memory_gib'):.2f}x")


def compare(args, configs, models, data, work):
    import statistics

    baseline = extract_commit(args.compare_to_commit, os.path.join(work, "baseline"))
    print(f"{'configuration':48s} {'s/step now':>10s} {args.compare_to_commit + ' s/step':>16s} {'then/now':>8s}  "
          "max |weight difference|")
    for name, (script, kind, flags) in configs.items():
        seconds = {"now": [], "then": []}
        for repeat in range(args.repeats):
            outs = {}
            for version, script_path in (("then", os.path.join(baseline, script)), ("now", script)):
                outs[version] = os.path.join(work, f"{name.replace(' ', '_')}-{version}-{repeat}")
                seconds[version].append(run(script_path, models[kind], data, outs[version],
                                            flags + ["--max_train_steps", args.steps])["seconds_per_step"])
            difference = max_difference(trained_weights(outs["now"]), trained_weights(outs["then"]))
        now, then = statistics.median(seconds["now"]), statistics.median(seconds["then"])
        print(f"{name:48s} {now:10.3f} {then:16.3f} {then / now:8.2f}  {difference:.3g}", flush=True)


if __name__ == "__main__":
    main()
