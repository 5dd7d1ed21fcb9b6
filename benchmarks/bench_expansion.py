#!/usr/bin/env python
"""LLM prompt expansion throughput: prompts/s rewritten one prompt per generate call vs --batch_size prompts per
call (generate_candidates.py's --expansion_batch_size), in one run, through generate_candidates.llm_variants.

    python benchmarks/bench_expansion.py --expansion_model /tmp/zoo/expander           # CPU, the tiny zoo LM
    python benchmarks/bench_expansion.py --expansion_model Qwen/Qwen2.5-7B-Instruct --mixed_precision bf16  # GPU
"""

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import generate_candidates  # noqa: E402

PROMPTS = ["a red circle on the left", "a cat sitting on a windowsill at dusk", "an astronaut riding a horse",
           "a bowl of fruit, still life", "a lighthouse in a storm", "two dogs playing in the snow",
           "a futuristic city skyline at night with flying cars", "a portrait of an old fisherman"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expansion_model", required=True)
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--num_variants", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=77)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    options = parser.parse_args()
    args = SimpleNamespace(expansion_model=options.expansion_model, mixed_precision=options.mixed_precision, seed=0,
                           num_variants=options.num_variants, expansion_temperature=0.8,
                           expansion_max_new_tokens=options.max_new_tokens,
                           expansion_instruction=generate_candidates.DEFAULT_INSTRUCTION)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, model = generate_candidates.load_expander(args, device)
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}, number {i}" for i in range(options.num_prompts)]
    generate_candidates.llm_variants(prompts[:2], 0, args, tokenizer, model)  # warm-up

    rates = {}
    for size in (1, options.batch_size):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(prompts), size):
            generate_candidates.llm_variants(prompts[start: start + size], start, args, tokenizer, model)
        if device == "cuda":
            torch.cuda.synchronize()
        rates[size] = len(prompts) / (time.perf_counter() - started)
        print(f"batch {size:3d}: {rates[size]:.2f} prompts/s ({options.num_variants} rewrites each, "
              f"up to {options.max_new_tokens} new tokens)")
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{options.expansion_model} on {name}: batch {options.batch_size} vs 1 = "
          f"{rates[options.batch_size] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
