#!/usr/bin/env python
"""CRAFT stage 1-3: the base model generates its own candidate images.

For every prompt, the prompt itself (variant 0) and K enriched rewrites of it (variants 1..K) are each rendered
with --num_images_per_prompt seeds. The output folder is a `datasets` imagefolder: images + metadata.jsonl with
file_name, text (the prompt rendered), original_prompt, group_id, variant_id, image_index, seed; plus
expansions.jsonl (the rewrites, reused on rerun) and generation_config.json (every setting).

Rerunning the same command resumes: finished images are skipped, a killed run leaves no half image or row.
Under `accelerate launch` the prompt groups are split across processes; the folder is identical to a
single-process run.
"""

import argparse
import os
import random
import sys
import time

import craft_generation as cg
import craft_pipelines as cp
import craft_utils as cu

EXPANSIONS = "expansions.jsonl"
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"  # --pretrained_model_name_or_path when none is given

# Detail/style rewrites that keep the prompt's meaning (the "template" expansion needs no model).
TEMPLATES = (
    "{prompt}, highly detailed, intricate details, sharp focus",
    "{prompt}, cinematic lighting, dramatic atmosphere, vibrant colors",
    "a professional photograph of {prompt}, soft natural light, 85mm lens, bokeh",
    "{prompt}, digital art, concept art, trending on artstation",
    "{prompt}, oil painting on canvas, rich textures, masterpiece",
    "{prompt}, golden hour, warm light, ultra realistic, 8k",
    "{prompt}, studio lighting, clean background, best quality",
    "{prompt}, wide angle, atmospheric perspective, highly detailed",
)

DEFAULT_INSTRUCTION = (
    "Rewrite the following text-to-image prompt into a more detailed prompt. Keep every subject, attribute and "
    "relation of the original, add details of style, lighting, composition and quality. Answer with the new "
    "prompt only, on one line."
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cg.add_generation_args(parser, default_model=DEFAULT_MODEL)
    cg.add_prompt_args(parser)
    group = parser.add_argument_group("prompt expansion")
    group.add_argument("--num_variants", type=int, default=3, help="rewrites per prompt (K); 0 = original only")
    group.add_argument("--expansion", choices=["template", "llm", "file"], default="template",
                       help="template: detail/style suffixes, no model; llm: an instruction-tuned causal LM "
                            "(--expansion_model); file: a jsonl of {prompt, variants} (--expansion_file)")
    group.add_argument("--expansion_model", help="causal LM with a chat template: Hub id or local folder")
    group.add_argument("--expansion_file", help='jsonl rows {"prompt": ..., "variants": [...]}')
    group.add_argument("--expansion_instruction", default=DEFAULT_INSTRUCTION, help="system message for the LLM")
    group.add_argument("--expansion_max_new_tokens", type=int, default=77, help="the LLM's longest rewrite, in tokens")
    group.add_argument("--expansion_temperature", type=float, default=0.8,
                       help="the LLM's sampling temperature (its K rewrites of a prompt are K samples)")
    group.add_argument("--expansion_batch_size", type=int, default=16,
                       help="prompts rewritten per LLM call (each gives --num_variants samples); the rewrites of a "
                            "batch are seeded by its first prompt, so this setting is recorded like the others")
    parser.add_argument("--output_dir", default="candidates", help="where the candidates imagefolder is written")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing candidates folder made with other settings and start over")
    args = parser.parse_args(input_args)
    cu.announce_default_model(args, DEFAULT_MODEL, input_args)
    cg.check_generation_args(args)

    if args.num_variants < 0:
        parser.error("--num_variants must be >= 0")
    if args.num_variants and args.expansion == "llm" and not args.expansion_model:
        parser.error("--expansion llm needs --expansion_model (a Hub id or local folder)")
    if args.num_variants and args.expansion == "file" and not args.expansion_file:
        parser.error("--expansion file needs --expansion_file")
    for flag, mode in (("expansion_file", "file"), ("expansion_model", "llm")):
        if getattr(args, flag) and (args.expansion != mode or not args.num_variants):
            parser.error(f"--{flag} is read only with --expansion {mode} and --num_variants > 0; leave it out")
    if args.expansion_batch_size < 1:
        parser.error(f"--expansion_batch_size must be at least 1 (got {args.expansion_batch_size})")
    if args.expansion == "template" and args.num_variants > len(TEMPLATES):
        parser.error(f"--expansion template has {len(TEMPLATES)} templates; ask for --num_variants <= {len(TEMPLATES)}")
    return args


def expansion_settings(args):
    settings = {"num_variants": args.num_variants, "expansion": args.expansion if args.num_variants else None}
    if args.num_variants and args.expansion == "llm":
        settings.update(expansion_model=args.expansion_model, expansion_instruction=args.expansion_instruction,
                        expansion_max_new_tokens=args.expansion_max_new_tokens,
                        expansion_temperature=args.expansion_temperature,
                        expansion_batch_size=args.expansion_batch_size)
    if args.num_variants and args.expansion == "file":
        settings["expansion_file_sha256"] = cu.sha256_of(load_expansion_file(args.expansion_file))
    return settings


def load_expansion_file(path):
    if not os.path.isfile(path):
        cu.fail(f"--expansion_file {path} does not exist")
    table = {}
    for number, row in enumerate(cu.read_jsonl(path), start=1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("variants"), list):
            cu.fail(f"{path}, row {number}: needs a 'prompt' string and a 'variants' list")
        table[row["prompt"].strip()] = [str(v).strip() for v in row["variants"]]
    return table


def template_variants(prompt, group_id, args):
    rng = random.Random(cu.derive_seed(args.seed, group_id, 0, 0))
    return [TEMPLATES[i].format(prompt=prompt) for i in rng.sample(range(len(TEMPLATES)), args.num_variants)]


def load_expander(args, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.expansion_model, padding_side="left")  # batched generation
        model = AutoModelForCausalLM.from_pretrained(
            args.expansion_model, dtype=getattr(torch, cu.TORCH_DTYPES[args.mixed_precision]))
    except (OSError, ValueError) as error:
        cu.fail(f"could not load --expansion_model {args.expansion_model} ({str(error).splitlines()[0]})")
    if not tokenizer.chat_template:
        cu.fail(f"--expansion_model {args.expansion_model} has no chat template; use an instruction-tuned model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(device).eval()


def llm_variants(prompts, first_group_id, args, tokenizer, model):
    """K sampled rewrites of each prompt, the whole batch in one generate call seeded by its first group."""
    import torch

    chats = [[{"role": "system", "content": args.expansion_instruction}, {"role": "user", "content": prompt}]
             for prompt in prompts]
    inputs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    torch.manual_seed(cu.derive_seed(args.seed, first_group_id, 0, 0))
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=True, temperature=args.expansion_temperature,
                                max_new_tokens=args.expansion_max_new_tokens, num_return_sequences=args.num_variants,
                                pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    # An empty answer would train on nothing: fall back to the original prompt (counted in the log line).
    texts = [(text.strip().splitlines() or [""])[0].strip().strip('"').strip() for text in texts]
    k = args.num_variants
    return [[text or prompt for text in texts[i * k: (i + 1) * k]] for i, prompt in enumerate(prompts)]


def expand_prompts(prompts, args, state):
    """[(prompt, [prompt, rewrite 1..K])] for every group; rewrites are logged as made and reused on rerun."""
    from tqdm.auto import tqdm

    if not args.num_variants:
        return [(prompt, [prompt]) for prompt in prompts]
    known = {row["group_id"]: row["variants"] for row in cu.read_logged_rows(args.output_dir, EXPANSIONS, "expansions")}
    table = load_expansion_file(args.expansion_file) if args.expansion == "file" else None
    # Fixed batches of group ids, dealt to the processes: a batch's rewrites never depend on the process count,
    # and a batch is redone whole (the same rewrites) if a kill lost part of it.
    size = args.expansion_batch_size if args.expansion == "llm" else 1
    batches = [list(range(start, min(start + size, len(prompts)))) for start in range(0, len(prompts), size)]
    todo = [batch for batch in batches[state.process_index:: state.num_processes] if any(g not in known for g in batch)]
    if todo and args.expansion == "llm":
        tokenizer, model = load_expander(args, state.device)
    log = cu.AppendLog(os.path.join(args.output_dir, cu.PROGRESS_DIR, f"expansions-{state.process_index:05d}.jsonl"))
    for batch in tqdm(todo, desc="rewrites", unit="batch", disable=not state.is_local_main_process or not todo):
        if args.expansion == "template":
            variants = [template_variants(prompts[g], g, args) for g in batch]
        elif args.expansion == "file":
            for g in batch:
                if prompts[g] not in table or len(table[prompts[g]]) < args.num_variants:
                    cu.fail(f"{args.expansion_file} has {len(table.get(prompts[g], []))} variants for the prompt "
                            f"{prompts[g]!r}, {args.num_variants} needed; add them or lower --num_variants")
            variants = [table[prompts[g]][: args.num_variants] for g in batch]
        else:
            variants = llm_variants([prompts[g] for g in batch], batch[0], args, tokenizer, model)
        log.append([{"group_id": g, "prompt": prompts[g], "variants": v} for g, v in zip(batch, variants)
                    if g not in known])
        cu.fault_point("expansions_logged")
    log.close()
    state.wait_for_everyone()
    if state.is_main_process:
        cu.merge_logged_rows(args.output_dir, EXPANSIONS, "expansions", key=lambda r: r["group_id"],
                             sort_key=lambda r: r["group_id"])
    state.wait_for_everyone()
    rows = cu.read_jsonl(os.path.join(args.output_dir, EXPANSIONS))
    fallbacks = sum(v == row["prompt"] for row in rows for v in row["variants"])
    if fallbacks and state.is_main_process:
        print(f"note: {fallbacks} rewrites were empty or equal to their prompt and render the original prompt",
              file=sys.stderr)
    return [(row["prompt"], [row["prompt"]] + row["variants"]) for row in rows]


def main(args):
    state = cu.process_state()
    prompts = cg.load_prompts(args)
    cg.resolve_sampling_settings(args)
    settings = {
        **cg.generation_settings(args), **expansion_settings(args),
        "prompts_source": args.prompts_file or f"{args.dataset_name}:{args.dataset_split}",
        "num_prompts": len(prompts), "prompts_sha256": cu.sha256_of(prompts),
    }
    start_over = cg.check_generation_folder(args.output_dir, settings, args.overwrite)
    pipe = cp.load_pipeline(args, state.device)
    cg.start_generation_folder(args.output_dir, settings, pipe, args, start_over, state)

    started = time.time()
    groups = expand_prompts(prompts, args, state)
    planned = cg.plan_images(groups, args.num_images_per_prompt, args.seed)
    made, seconds = cg.generate_images(pipe, planned, args.output_dir, args, state)
    if state.is_main_process:
        print(f"{len(planned)} images for {len(groups)} prompts x {args.num_variants + 1} texts x "
              f"{args.num_images_per_prompt} seeds in {args.output_dir} ({made} made now by process 0 of "
              f"{state.num_processes}, {made / max(seconds, 1e-9):.2f} img/s; {time.time() - started:.0f} s in all)")


if __name__ == "__main__":
    args = parse_args()
    with cu.write_faults_in_one_line(args.output_dir):
        main(args)
