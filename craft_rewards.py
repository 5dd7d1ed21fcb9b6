"""Rewards as the stages use them: the reward flags (where each model's weights are), reward names checked against
craft_reward_models' registry, and scoring an imagefolder, cached in its rewards.jsonl (one column per reward, merged
under the folder's lock) with images decoded ahead while a model runs."""

import argparse
import collections
import concurrent.futures
import gc
import math
import os

import craft_reward_models as cm
import craft_utils as cu

REWARDS_FILE = "rewards.jsonl"  # beside an imagefolder's metadata.jsonl: file_name + one column per reward


def add_reward_args(parser):
    group = parser.add_argument_group("reward models (a Hub id, 'owner/repo/file' for a file on the Hub, or a local path)")
    group.add_argument("--hpsv2_checkpoint", default="xswu/HPSv2/HPS_v2.1_compressed.pt",
                       help="HPSv2.1 checkpoint (reward 'hpsv2.1')")
    group.add_argument("--hpsv2_0_checkpoint", default="xswu/HPSv2/HPS_v2_compressed.pt",
                       help="HPSv2.0 checkpoint (reward 'hpsv2.0')")
    group.add_argument("--hps_model", default="ViT-H-14",
                       help="open_clip architecture of the HPS checkpoints: a model name or a model-config .json")
    group.add_argument("--pickscore_model", default="yuvalkirstain/PickScore_v1")
    group.add_argument("--pickscore_processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    group.add_argument("--aesthetic_checkpoint", default="trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
                       help="LAION aesthetic predictor v2 MLP (sac+logos+ava1-l14-linearMSE.pth)")
    group.add_argument("--aesthetic_clip_model", default="openai/clip-vit-large-patch14",
                       help="the CLIP whose image embedding the aesthetic MLP reads")
    group.add_argument("--imagereward_checkpoint", default="THUDM/ImageReward/ImageReward.pt")
    group.add_argument("--imagereward_med_config", default="THUDM/ImageReward/med_config.json")
    group.add_argument("--imagereward_tokenizer", default="bert-base-uncased", help="BERT tokenizer of ImageReward")
    group.add_argument("--clip_model", default="openai/clip-vit-large-patch14", help="CLIP for the 'clip' score")
    group.add_argument("--reward_batch_size", type=_positive, default=16, help="images per reward-model call")
    group.add_argument("--image_decode_workers", type=_count, default=4,
                       help="threads that read and decode the next batches' images while a reward model runs (0: "
                            "in turn, in the main thread)")
    group.add_argument("--reward_precision", choices=sorted(cu.TORCH_DTYPES), default="no",
                       help="dtype of the reward models (fp16/bf16 halve their memory on GPUs)")


def _count(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _positive(text):
    if not text.isdigit() or not int(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def parse_reward_names(text, flag="--rewards"):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in cm.REWARDS]
    if unknown or not names:
        cu.fail(f"{flag}: unknown reward {', '.join(unknown) or '(none given)'}; valid: {', '.join(sorted(cm.REWARDS))}")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------------------------
# Scoring an imagefolder, cached in its rewards.jsonl


def is_valid_score(value):
    """A cached score is a finite number (not NaN, inf, a string, or a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_folder(folder, caption_column):
    """Rows of an imagefolder with the text each image is scored against; every bad row is refused up front."""
    metadata = os.path.join(folder, cu.METADATA)
    if not os.path.isdir(folder):
        cu.fail(f"{folder} does not exist")
    if not os.path.isfile(metadata):
        cu.fail(f"{folder} has no {cu.METADATA}; score an imagefolder (images + metadata.jsonl with file_name and "
                "a text column), e.g. the output of generate_candidates.py")
    rows = cu.read_jsonl(metadata)
    if not rows:
        cu.fail(f"{metadata} has no rows")
    cu.refuse_repeated_rows(rows, metadata)
    for number, row in enumerate(rows, start=1):
        path = cu.path_in_folder(folder, row.get("file_name"), f"{metadata}, row {number}")
        text = row.get("original_prompt") or row.get(caption_column)
        if not isinstance(text, str) or not text.strip():
            cu.fail(f"{metadata}, row {number}: no text (neither original_prompt nor {caption_column}); "
                    "fill it in or set --caption_column")
        cu.check_image(path, f"{metadata}, row {number}", decode=False)
        row["_text"], row["_where"] = text, f"{metadata}, row {number}"
    return rows


def decoded_ahead(batches, folder, workers):
    """Each batch's images, decoded by `workers` threads up to 2 x workers batches ahead of the one being scored
    (PNG decoding releases the GIL); a bad image still ends in the one line naming its row."""
    def decode(batch):
        return [cu.open_image(os.path.join(folder, row["file_name"]), row["_where"]) for row in batch]

    if not workers:
        yield from map(decode, batches)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.submit(decode, batch))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_scores(path, rows, table, name):
    """rewards.jsonl with the reward `name` just computed (in `table`), merged under the folder's lock into what is on
    disk now: a run scoring other rewards of the same folder at the same time keeps its columns, and `table` gets
    theirs."""
    with cu.folder_lock(os.path.dirname(path)):
        on_disk = {row["file_name"]: row for row in cu.read_jsonl(path)} if os.path.exists(path) else {}
        for row in rows:
            scores = table[row["file_name"]]
            scores.update({**on_disk.get(row["file_name"], {}), name: scores[name]})
        cu.write_jsonl_atomic(path, [table[row["file_name"]] for row in rows])


def score_folders(folders, names, args, state, caption_column="text", overwrite=False):
    """Add the rewards `names` to each folder's rewards.jsonl where missing (all of them with `overwrite`), loading
    each reward model once for all the folders.

    Returns {folder: (its rows, with `_text` the text scored; {file_name: {reward: score}})}. Each image is
    scored in the same fixed batch whatever the process count, so a multi-process run writes what one process would.
    """
    import torch
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    folders = list(dict.fromkeys(folders))
    rows = {folder: read_folder(folder, caption_column) for folder in folders}
    if state.is_main_process:
        for folder in folders:
            cu.remove_temp_files(folder)  # a kill while rewards.jsonl was being replaced
    state.wait_for_everyone()
    paths = {folder: os.path.join(folder, REWARDS_FILE) for folder in folders}
    tables = {}
    for folder, path in paths.items():
        cached = {row["file_name"]: row for row in cu.read_jsonl(path)} if os.path.exists(path) else {}
        tables[folder] = {row["file_name"]: {**cached.get(row["file_name"], {}), "file_name": row["file_name"]}
                          for row in rows[folder]}
    for name in names:
        todo = [folder for folder in folders
                if overwrite or any(tables[folder][row["file_name"]].get(name) is None for row in rows[folder])]
        if state.is_main_process:
            for folder in folders:
                if folder not in todo:
                    print(f"{name}: already in {paths[folder]}, kept (--overwrite recomputes)")
        if not todo:
            continue
        reward = cm.load_reward(name, args, state.device)
        for folder in todo:
            table, size = tables[folder], args.reward_batch_size
            batches = [rows[folder][i: i + size] for i in range(0, len(rows[folder]), size)]
            scored = []
            mine = batches[state.process_index:: state.num_processes]
            decoded = decoded_ahead(mine, folder, args.image_decode_workers)
            for batch in tqdm(mine, unit="batch", desc=f"{name} ({os.path.basename(folder.rstrip('/'))})",
                              disable=not state.is_local_main_process):
                scores = reward(next(decoded), [row["_text"] for row in batch])
                scored += [(row["file_name"], score) for row, score in zip(batch, scores)]
            for file_name, score in gather_object(scored):
                table[file_name][name] = score
            if state.is_main_process:  # after each reward, so a kill loses at most the reward being computed
                write_scores(paths[folder], rows[folder], table, name)
                cu.fault_point("reward_written")
        del reward
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    state.wait_for_everyone()
    return {folder: (rows[folder], tables[folder]) for folder in folders}


# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# ImageReward through the `image-reward` package (BLIP ViT + BERT cross-encoder + MLP)
