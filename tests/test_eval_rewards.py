import io
import json
import shutil
import statistics

import numpy as np
import pytest
from PIL import Image

import craft_reward_models as cm
import craft_utils as cu
import eval_rewards
from conftest import TWO_PROCESSES, run_script
from make_tiny_models import reward_flags

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle at night"]


def evaluate(zoo, *args, check=True, launcher=None):
    return run_script("eval_rewards.py", *args, *reward_flags(zoo), "--reward_batch_size", 2, check=check,
                      launcher=launcher)


def evaluation_args(zoo):
    """eval_rewards.py's arguments pointing the rewards at the zoo, to load a reward here."""
    return eval_rewards.parse_args(["--images_dir", "unused", *map(str, reward_flags(zoo))])


def jpeg_score(image):
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return -len(buffer.getvalue()) / 1000


def write_folder(folder, rows_and_images):
    """An imagefolder made by hand: [(metadata row, PIL image)]."""
    folder.mkdir(parents=True)
    rows = []
    for row, image in rows_and_images:
        image.save(folder / row["file_name"])
        rows.append(row)
    cu.write_jsonl_atomic(folder / "metadata.jsonl", rows)
    return folder


@pytest.fixture(scope="module")
def candidates(zoo, tmp_path_factory):
    base = tmp_path_factory.mktemp("candidates")
    (base / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run_script("generate_candidates.py", "--pretrained_model_name_or_path", zoo / "sd15", "--prompts_file",
               base / "prompts.txt", "--output_dir", base / "out", "--num_inference_steps", 2, "--num_variants", 1,
               "--num_images_per_prompt", 2)
    return base / "out"


def test_folder_scores_cache_and_overwrite(zoo, candidates, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(candidates, folder)
    evaluate(zoo, "--images_dir", folder, "--rewards", "jpeg,hpsv2.1")
    rows = cu.read_jsonl(folder / "rewards.jsonl")
    metadata = cu.read_jsonl(folder / "metadata.jsonl")
    assert [r["file_name"] for r in rows] == [m["file_name"] for m in metadata] and len(rows) == 12
    assert set(rows[0]) == {"file_name", "jpeg", "hpsv2.1"}
    for row in rows:
        assert row["jpeg"] == jpeg_score(Image.open(folder / row["file_name"]))

    # a cached column is kept as it is (no recompute) when another reward is added
    rows[0]["hpsv2.1"] = 123.0
    cu.write_jsonl_atomic(folder / "rewards.jsonl", rows)
    result = evaluate(zoo, "--images_dir", folder, "--rewards", "jpeg,hpsv2.1,aesthetic")
    assert "hpsv2.1: already in" in result.stdout
    rows = cu.read_jsonl(folder / "rewards.jsonl")
    assert rows[0]["hpsv2.1"] == 123.0 and all("aesthetic" in r for r in rows)

    summary = json.loads((folder / "rewards_summary.json").read_text())["rewards"]
    values = [r["hpsv2.1"] for r in rows]
    assert summary["hpsv2.1"] == pytest.approx({"mean": statistics.fmean(values), "std": statistics.stdev(values),
                                                "median": statistics.median(values), "n": 12})
    assert "| hpsv2.1 |" in (folder / "rewards_summary.md").read_text()
    assert Image.open(folder / "rewards_hist.png").size[0] >= 3 * 300  # one panel per reward

    evaluate(zoo, "--images_dir", folder, "--rewards", "hpsv2.1", "--overwrite")
    assert cu.read_jsonl(folder / "rewards.jsonl")[0]["hpsv2.1"] != 123.0


def test_rewrites_are_scored_against_the_original_prompt(zoo, candidates, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(candidates, folder)
    evaluate(zoo, "--images_dir", folder, "--rewards", "hpsv2.1")
    metadata = cu.read_jsonl(folder / "metadata.jsonl")
    # the same image under its rewrite text scores the same: the text used is original_prompt
    for row in metadata:
        row["text"] = "something else entirely"
    cu.write_jsonl_atomic(folder / "metadata.jsonl", metadata)
    scores = [r["hpsv2.1"] for r in cu.read_jsonl(folder / "rewards.jsonl")]
    evaluate(zoo, "--images_dir", folder, "--rewards", "hpsv2.1", "--overwrite")
    assert [r["hpsv2.1"] for r in cu.read_jsonl(folder / "rewards.jsonl")] == pytest.approx(scores, abs=1e-6)


def test_compare_to_pairs_by_prompt_and_seed(zoo, tmp_path):
    rng = np.random.default_rng(0)
    flat = [Image.new("RGB", (64, 64), (40 * i, 90, 200 - 30 * i)) for i in range(5)]
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(5)]
    # tuned vs base on 5 (prompt, seed) pairs: 3 wins (flat vs noise), 1 tie (same image), 1 loss; rows shuffled
    tuned_images = [flat[0], flat[1], flat[2], flat[3], noise[4]]
    base_images = [noise[0], noise[1], noise[2], flat[3], flat[4]]
    keys = [("a red circle", 11), ("a red circle", 12), ("a blue square", 11), ("a star", 5), ("a cat", 7)]

    def rows(images, order, extra):
        return [({"file_name": f"{i}.png", "text": keys[i][0], "seed": keys[i][1], **extra}, images[i]) for i in order]

    tuned = write_folder(tmp_path / "tuned", rows(tuned_images, [4, 2, 0, 3, 1], {}))
    base = write_folder(tmp_path / "base", rows(base_images, [0, 1, 2, 3, 4], {}) +
                        [({"file_name": "extra.png", "text": "unpaired", "seed": 1}, noise[0])])
    result = evaluate(zoo, "--images_dir", tuned, "--compare_to", base, "--rewards", "jpeg")
    comparison = json.loads((tuned / "rewards_summary.json").read_text())["comparison"]
    deltas = [jpeg_score(t) - jpeg_score(b) for t, b in zip(tuned_images, base_images)]
    assert comparison["pairs"] == 5
    assert comparison["rewards"]["jpeg"] == pytest.approx({
        "mean_delta": statistics.fmean(deltas), "stderr": statistics.stdev(deltas) / 5 ** 0.5, "n": 5,
        "win_rate": 0.6, "tie_rate": 0.2, "loss_rate": 0.2,
        "mean": statistics.fmean(map(jpeg_score, tuned_images)),
        "baseline_mean": statistics.fmean(map(jpeg_score, base_images))})
    assert "| jpeg |" in result.stdout and "60.0%" in result.stdout
    assert (base / "rewards.jsonl").exists()  # the baseline was scored too, once
    assert (comparison["unpaired"], comparison["baseline_unpaired"]) == (0, 1)
    assert f"note: compared on the 5 (prompt, seed) pairs found in both folders; 0 image(s) of {tuned} and 1 of " \
           f"{base} have no partner" in result.stdout

    # the same prompts with other seeds (a prompts file in another order gives its prompts other seeds)
    shifted = write_folder(tmp_path / "shifted", [({**row, "seed": row["seed"] + 100}, image)
                                                  for row, image in rows(base_images, [0, 1, 2, 3, 4], {})])
    result = run_script("eval_rewards.py", "--images_dir", tuned, "--compare_to", shifted, "--rewards", "jpeg",
                        check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tuned} and {shifted} share no (prompt, seed) pair though they share 4 prompt(s): a seed follows its "
        "prompt's position in the prompts file, so generate both from the same file, in the same order, with the "
        "same --seed")


def test_two_processes_score_like_one(zoo, candidates, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(candidates, one)
    shutil.copytree(candidates, two)
    evaluate(zoo, "--images_dir", one, "--rewards", "hpsv2.1,jpeg")
    evaluate(zoo, "--images_dir", two, "--rewards", "hpsv2.1,jpeg", launcher=TWO_PROCESSES)
    assert (two / "rewards.jsonl").read_text() == (one / "rewards.jsonl").read_text()


EVAL_KILL_FLAGS = ("--rewards", "jpeg,hpsv2.1")


def eval_model_flags(folder):
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return ("--prompts_file", folder / "prompts.txt", "--num_inference_steps", 2, "--num_images_per_prompt", 2,
            "--batch_size", 2)


@pytest.fixture(scope="module")
def uninterrupted(zoo, candidates, tmp_path_factory):
    """Folder mode and model mode, each run once without a kill: what the kill tests must reproduce."""
    base = tmp_path_factory.mktemp("uninterrupted")
    shutil.copytree(candidates, base / "folder")
    # new Pythons: other string hashing than the runs they must equal
    run_script("eval_rewards.py", "--images_dir", base / "folder", *EVAL_KILL_FLAGS, *reward_flags(zoo),
               fresh_interpreter=True)
    run_script("eval_rewards.py", "--pretrained_model_name_or_path", zoo / "sd15", "--output_dir", base / "model",
               *eval_model_flags(base), *EVAL_KILL_FLAGS, *reward_flags(zoo), fresh_interpreter=True)
    return {"folder": base / "folder", "model": base / "model"}


@pytest.mark.parametrize("mode,kill_at", [("folder", "reward_written"), ("model", "images_written#2"),
                                          ("model", "logs_merged"), ("model", "reward_written")])
def test_killed_evaluation_rerun_equals_an_uninterrupted_one(zoo, candidates, tmp_path, mode, kill_at,
                                                             uninterrupted):
    """Killed after the first of two rewards is saved (folder and model mode) or while generating (model mode):
    the rerun's rewards.jsonl and summary equal those of a run that was never stopped."""
    straight, killed = uninterrupted[mode], tmp_path / "killed"
    if mode == "folder":
        shutil.copytree(candidates, killed)
        where = ("--images_dir", killed)
    else:
        where = ("--pretrained_model_name_or_path", zoo / "sd15", "--output_dir", killed,
                 *eval_model_flags(straight.parent))
    run_script("eval_rewards.py", *where, *EVAL_KILL_FLAGS, *reward_flags(zoo), kill_at=kill_at)
    run_script("eval_rewards.py", *where, *EVAL_KILL_FLAGS, *reward_flags(zoo))
    for name in ("rewards.jsonl", "metadata.jsonl"):
        assert (killed / name).read_text() == (straight / name).read_text()
    summaries = [json.loads((folder / "rewards_summary.json").read_text()) for folder in (straight, killed)]
    assert summaries[0] == summaries[1]
    assert not [p.name for p in killed.iterdir() if p.name.startswith(".")]


def test_model_mode_generates_with_the_candidate_seeds_and_scores(zoo, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ("--prompts_file", tmp_path / "prompts.txt", "--num_inference_steps", 2, "--num_images_per_prompt", 2,
              "--rewards", "jpeg")
    evaluate(zoo, "--pretrained_model_name_or_path", zoo / "sd15", "--output_dir", tmp_path / "base", *common)
    evaluate(zoo, "--pretrained_model_name_or_path", zoo / "sd15", "--output_dir", tmp_path / "same",
             "--compare_to", tmp_path / "base", *common)
    rows = cu.read_jsonl(tmp_path / "base" / "metadata.jsonl")
    assert [(r["text"], r["seed"]) for r in rows] == [
        (p, cu.derive_seed(0, g, 0, i)) for g, p in enumerate(PROMPTS) for i in range(2)]
    comparison = json.loads((tmp_path / "same" / "rewards_summary.json").read_text())["comparison"]
    assert comparison["pairs"] == 6 and comparison["rewards"]["jpeg"]["tie_rate"] == 1.0  # same model, same seeds


@pytest.mark.parametrize("case", ["no_metadata", "corrupt_image", "truncated_image", "no_file_name", "no_text",
                                  "nan_cached", "string_cached", "missing_weights", "unknown_reward"])
def test_bad_input_is_one_clear_error_and_writes_nothing(zoo, tmp_path, case):
    folder = write_folder(tmp_path / "f", [({"file_name": f"{i}.png", "text": "a cat", "seed": i},
                                            Image.new("RGB", (32, 32), (i, 0, 0))) for i in range(3)])
    extra = ["--rewards", "jpeg"]
    if case == "no_metadata":
        (folder / "metadata.jsonl").unlink()
        expected = f"{folder} has no metadata.jsonl"
    elif case == "corrupt_image":
        (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        expected = f"{folder}/metadata.jsonl, row 2: cannot read image {folder}/1.png"
    elif case == "truncated_image":  # its header and chunks are whole: only decoding it finds the gap
        data = (folder / "2.png").read_bytes()
        (folder / "2.png").write_bytes(data[:-30] + data[-12:])  # IDAT cut short, IEND kept
        expected = f"{folder}/metadata.jsonl, row 3: cannot read image {folder}/2.png"
    elif case == "no_file_name":
        cu.write_jsonl_atomic(folder / "metadata.jsonl", [{"file_name": "0.png", "text": "a"}, {"text": "b"}])
        expected = f"{folder}/metadata.jsonl, row 2: no 'file_name'; each row names its image file"
    elif case in ("nan_cached", "string_cached"):
        value = float("nan") if case == "nan_cached" else "high"
        cu.write_jsonl_atomic(folder / "rewards.jsonl", [{"file_name": f"{i}.png", "jpeg": -1.0 if i else value}
                                                         for i in range(3)])
        expected = (f"{folder}/rewards.jsonl: jpeg score of 0.png (image 1 of metadata.jsonl) is "
                    f"{value!r}; delete that value to rescore it, or rerun with --overwrite")
    elif case == "no_text":
        cu.write_jsonl_atomic(folder / "metadata.jsonl", [{"file_name": "0.png", "text": "a"},
                                                          {"file_name": "1.png", "text": ""}])
        expected = f"{folder}/metadata.jsonl, row 2: no text (neither original_prompt nor text)"
    elif case == "missing_weights":
        extra = ["--rewards", "jpeg,hpsv2.1", "--hpsv2_checkpoint", str(tmp_path / "nope.pt")]
        expected = f"--hpsv2_checkpoint {tmp_path}/nope.pt: not found"
    else:
        extra = ["--rewards", "jpeg,hpsv"]
        expected = "--rewards: unknown reward hpsv; valid:"
    result = run_script("eval_rewards.py", "--images_dir", folder, *extra, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
    if case in ("nan_cached", "string_cached"):  # the cache is left as it was
        assert [r["jpeg"] for r in cu.read_jsonl(folder / "rewards.jsonl")][1:] == [-1.0, -1.0]
    assert not (folder / "rewards.jsonl").exists() or case in ("missing_weights", "nan_cached", "string_cached")
    if case == "missing_weights":  # jpeg was done and kept; the failing reward left nothing half
        assert set(cu.read_jsonl(folder / "rewards.jsonl")[0]) == {"file_name", "jpeg"}


STYLES = ("anime", "concept-art", "paintings", "photo")


def hpdv2_benchmark_files(folder):
    """HPDv2's benchmark/ layout: one JSON array of prompt strings per style."""
    folder.mkdir()
    for style in STYLES:
        prompts = [f"a {colour} {shape}, {style}" for colour, shape in [("red", "circle"), ("blue", "star"),
                                                                         ("green", "square")]]
        (folder / f"{style}.json").write_text(json.dumps(prompts))
    return folder


def test_hpsv2_benchmark_reports_each_style_and_their_average_against_the_base(zoo, tmp_path):
    prompts = hpdv2_benchmark_files(tmp_path / "benchmark")
    common = ("--pretrained_model_name_or_path", zoo / "sd15", "--benchmark", "hpsv2", "--benchmark_prompts", prompts,
              "--max_prompts", 2, "--num_images_per_prompt", 2, "--rewards", "hpsv2.1,jpeg,clip")
    evaluate(zoo, *common, "--num_inference_steps", 2, "--output_dir", tmp_path / "base")
    result = evaluate(zoo, *common, "--num_inference_steps", 3, "--output_dir", tmp_path / "tuned",
                      "--compare_to", tmp_path / "base")
    report = json.loads((tmp_path / "tuned" / "benchmark_hpsv2.json").read_text())
    assert list(report["parts"]) == list(STYLES) and report["shown_x100"] == ["hpsv2.1"]

    # by hand from each style's folders: pairs by (prompt, seed), the first 2 prompts of each style file
    for style in STYLES:
        def scores(model):
            metadata = cu.read_jsonl(tmp_path / model / style / "metadata.jsonl")
            table = {r["file_name"]: r for r in cu.read_jsonl(tmp_path / model / style / "rewards.jsonl")}
            return {(r["text"], r["seed"]): table[r["file_name"]] for r in metadata}

        tuned, base = scores("tuned"), scores("base")
        assert sorted({text for text, _ in tuned}) == sorted(json.loads((prompts / f"{style}.json").read_text())[:2])
        for name in ("jpeg", "hpsv2.1"):
            deltas = [tuned[key][name] - base[key][name] for key in tuned]
            assert report["parts"][style]["rewards"][name] == pytest.approx({
                "mean": statistics.fmean(tuned[key][name] for key in tuned),
                "baseline_mean": statistics.fmean(base[key][name] for key in tuned),
                "mean_delta": statistics.fmean(deltas), "stderr": statistics.stdev(deltas) / 4 ** 0.5,
                "win_rate": sum(d > 0 for d in deltas) / 4})
    # diversity across a prompt's two seeds, from the clip reward's image embeddings: 1 - cosine, by hand
    clip = cm.load_reward("clip", evaluation_args(zoo), "cpu")
    anime = {}
    for model in ("tuned", "base"):
        by_prompt = {}
        for row in cu.read_jsonl(tmp_path / model / "anime" / "metadata.jsonl"):
            by_prompt.setdefault(row["text"], []).append(Image.open(tmp_path / model / "anime" / row["file_name"]))
        anime[model] = [1 - float(clip.embed_images(images)[0] @ clip.embed_images(images)[1])
                        for images in by_prompt.values()]
    compared = json.loads((tmp_path / "tuned" / "anime" / "rewards_summary.json").read_text())["comparison"]
    assert compared["diversity_measure"] == "1 - cosine of clip's image embeddings"
    assert compared["diversity"]["mean"] == pytest.approx(statistics.fmean(anime["tuned"]), abs=1e-6)
    assert compared["diversity"]["baseline_mean"] == pytest.approx(statistics.fmean(anime["base"]), abs=1e-6)
    parts = [json.loads((tmp_path / "tuned" / style / "rewards_summary.json").read_text())["comparison"]
             for style in STYLES]
    assert report["diversity"]["delta"] == pytest.approx(statistics.fmean(p["diversity"]["delta"] for p in parts))
    assert report["drift"]["saturation"]["delta"] == \
        pytest.approx(statistics.fmean(p["drift"]["saturation"]["delta"] for p in parts))
    assert report["drift"]["saturation"]["n"] == 16 and report["trained_rewards"] is None
    for name in ("jpeg", "hpsv2.1"):
        rows = [report["parts"][style]["rewards"][name] for style in STYLES]
        average = report["average"][name]
        assert average["mean"] == pytest.approx(statistics.fmean(r["mean"] for r in rows))
        assert average["mean_delta"] == pytest.approx(statistics.fmean(r["mean_delta"] for r in rows))
        assert average["stderr"] == pytest.approx(sum(r["stderr"] ** 2 for r in rows) ** 0.5 / 4)

    # the paper's layout: the base's row, the tuned row, HPSv2.1 x100, then a table per reward with each style
    markdown = (tmp_path / "tuned" / "benchmark_hpsv2.md").read_text()
    hps = report["average"]["hpsv2.1"]
    assert f"| {tmp_path / 'base'} | {hps['baseline_mean'] * 100:.4g} |" in markdown
    assert f"| {tmp_path / 'tuned'} | {hps['mean'] * 100:.4g} |" in markdown
    assert f"| anime | {report['parts']['anime']['rewards']['hpsv2.1']['baseline_mean'] * 100:.4g} |" in markdown
    assert "HPSv2.1 per part" in markdown and "| average |" in markdown and markdown in result.stdout
    assert Image.open(tmp_path / "tuned" / "benchmark_hpsv2.png").size[0] > 400

    # folder mode on the same images: the scores are reused, the report is the same
    evaluate(zoo, "--images_dir", tmp_path / "tuned", "--benchmark", "hpsv2", "--compare_to", tmp_path / "base",
             "--rewards", "jpeg,hpsv2.1,clip")
    assert json.loads((tmp_path / "tuned" / "benchmark_hpsv2.json").read_text()) == report


def test_parti_benchmark_reads_the_prompt_column_of_a_dataset(zoo, tmp_path):
    (tmp_path / "parti").mkdir()
    (tmp_path / "parti" / "PartiPrompts.csv").write_text(
        "Prompt,Category\na red circle,Basic\na blue star,Basic\na green square,Basic\n")
    evaluate(zoo, "--pretrained_model_name_or_path", zoo / "sd15", "--benchmark", "parti", "--benchmark_prompts",
             tmp_path / "parti", "--max_prompts", 2, "--num_images_per_prompt", 1, "--num_inference_steps", 2,
             "--rewards", "jpeg",
             "--output_dir", tmp_path / "eval")
    assert [r["text"] for r in cu.read_jsonl(tmp_path / "eval" / "parti" / "metadata.jsonl")] == [
        "a red circle", "a blue star"]
    report = json.loads((tmp_path / "eval" / "benchmark_parti.json").read_text())
    jpeg = [r["jpeg"] for r in cu.read_jsonl(tmp_path / "eval" / "parti" / "rewards.jsonl")]
    assert report["average"]["jpeg"] == {"mean": pytest.approx(statistics.fmean(jpeg))}
    assert report["baseline"] is None


@pytest.mark.parametrize("case", ["no_prompts_folder", "missing_style", "not_a_benchmark_folder", "with_prompts_file"])
def test_bad_benchmark_input_is_one_clear_error(zoo, tmp_path, case):
    prompts = hpdv2_benchmark_files(tmp_path / "benchmark")
    model = ("--pretrained_model_name_or_path", zoo / "sd15", "--benchmark", "hpsv2", "--rewards", "jpeg",
             "--output_dir", tmp_path / "eval")
    if case == "no_prompts_folder":
        args, expected = model, ("error: --benchmark hpsv2 needs --benchmark_prompts, the folder of HPDv2's benchmark "
                                 "files: hf download ymhao/HPDv2 benchmark/ --repo-type dataset --local-dir hpdv2, "
                                 "then --benchmark_prompts hpdv2/benchmark")
    elif case == "missing_style":
        (prompts / "photo.json").unlink()
        args = (*model, "--benchmark_prompts", prompts)
        expected = (f"error: --benchmark_prompts {prompts}: no photo.json in it; --benchmark hpsv2 reads anime.json, "
                    "concept-art.json, paintings.json, photo.json (HPDv2's benchmark/ folder)")
    elif case == "not_a_benchmark_folder":
        (tmp_path / "flat").mkdir()
        args = ("--images_dir", tmp_path / "flat", "--benchmark", "hpsv2", "--rewards", "jpeg")
        expected = (f"error: {tmp_path / 'flat' / 'anime'} does not exist: {tmp_path / 'flat'} is not a --benchmark "
                    "hpsv2 folder (one subfolder per part: anime, concept-art, paintings, photo)")
    else:
        args = (*model, "--benchmark_prompts", prompts, "--prompts_file", prompts / "anime.json")
        expected = "error: --benchmark reads its own prompts (--benchmark_prompts); drop --prompts_file/--dataset_name"
    result = run_script("eval_rewards.py", *args, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(expected)  # argparse's lines start with the usage
    assert not (tmp_path / "eval").exists()


def test_a_run_scoring_other_rewards_of_the_folder_at_the_same_time_keeps_its_columns(tmp_path, monkeypatch):
    """Two runs score one folder with different rewards at once: while this one scores `mine`, the other writes its
    `theirs` column (done here from inside the reward, deterministically); this run's write merges under the folder's
    lock, so rewards.jsonl ends with both columns and neither run's scores are lost."""
    from types import SimpleNamespace

    import craft_reward_models as cm
    import craft_rewards as cr

    folder = tmp_path / "folder"
    folder.mkdir()
    rows = [{"file_name": f"{i}.png", "text": f"prompt {i}"} for i in range(3)]
    for row in rows:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / row["file_name"])
    cu.write_jsonl_atomic(folder / "metadata.jsonl", rows)

    def other_run_writes():  # what the other run's write_scores puts on disk meanwhile
        cu.write_jsonl_atomic(folder / "rewards.jsonl", [{"file_name": r["file_name"], "theirs": 7.0} for r in rows])

    def factory(args, device, dtype):
        def score(images, prompts):
            other_run_writes()
            return [float(len(prompt)) for prompt in prompts]
        return score

    monkeypatch.setitem(cm.REWARDS, "mine", factory)
    args = SimpleNamespace(reward_batch_size=16, image_decode_workers=0, reward_precision="no")
    _, table = cr.score_folders([str(folder)], ["mine"], args, cu.process_state())[str(folder)]
    written = cu.read_jsonl(folder / "rewards.jsonl")
    assert written == [{"file_name": r["file_name"], "theirs": 7.0, "mine": 8.0} for r in rows]
    assert table["0.png"] == written[0]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the lock is the folder's, no file
