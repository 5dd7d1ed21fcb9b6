import json
import math

import numpy as np
import pytest
from PIL import Image

import craft_utils as cu
import crf_filter
from conftest import run_script
from make_tiny_models import reward_flags

NAMES = ["hpsv2.1", "pickscore", "aesthetic"]

# group 0: two original-prompt seeds (reference mean = 0.26, 20.5, 5.5; max = 0.27, 21, 6) and four rewrite images
GROUP_0 = [
    (0, 0, (0.25, 20.0, 5.0)), (0, 1, (0.27, 21.0, 6.0)),
    (1, 0, (0.30, 22.0, 6.5)),   # beats mean and max on all three
    (1, 1, (0.265, 20.8, 5.4)),  # beats the mean on hps and pickscore only; nothing against max
    (2, 0, (0.30, 19.0, 7.0)),   # fails pickscore
    (2, 1, (0.20, 23.0, 7.0)),   # fails hps
]
GROUP_1 = [(0, 0, (0.0, 20.0, 5.0)), (1, 0, (1.0, 21.0, 6.0))]  # 2 images: z = -1, +1, so A = -1, +1


def make_candidates(folder, groups, names=NAMES):
    """A scored candidates folder by hand: {group_id: [(variant, index, scores)]}."""
    folder.mkdir()
    metadata, rewards = [], []
    for group_id, members in groups.items():
        for variant, index, scores in members:
            name = f"{group_id:06d}_v{variant:02d}_i{index:02d}.png"
            Image.new("RGB", (8, 8), (group_id * 40, variant * 60, index * 90)).save(folder / name)
            prompt = f"prompt {group_id}"
            metadata.append({"file_name": name, "text": prompt if variant == 0 else f"{prompt}, rewrite {variant}",
                             "original_prompt": prompt, "group_id": group_id, "variant_id": variant,
                             "image_index": index, "seed": 100 * variant + index})
            rewards.append({"file_name": name, **dict(zip(names, scores))})
    cu.write_jsonl_atomic(folder / "metadata.jsonl", metadata)
    cu.write_jsonl_atomic(folder / "rewards.jsonl", rewards)
    return folder


def run_filter(candidates, out, *flags):
    crf_filter.main(crf_filter.parse_args(["--candidates_dir", str(candidates), "--output_dir", str(out),
                                           *map(str, flags)]))
    return {row["file_name"]: row for row in cu.read_jsonl(out / "metadata.jsonl")}


def kept_names(rows):
    return sorted((row["group_id"], row["variant_id"], int(row["file_name"][-6:-4])) for row in rows.values())


def hand_advantages(scores, weights):
    """The advantage formula written out with numpy, for comparison."""
    scores = np.asarray(scores, dtype=np.float64)
    z = (scores - scores.mean(0)) / (scores.std(0) + 1e-8)
    total = z @ np.asarray(weights, dtype=np.float64)
    return (total - total.mean()) / (total.std() + 1e-8)


@pytest.mark.parametrize("rewards,reference,expected", [
    ("hpsv2.1", "mean", [(0, 1, 0), (0, 1, 1), (0, 2, 0)]),
    ("hpsv2.1,aesthetic", "mean", [(0, 1, 0), (0, 2, 0)]),
    ("hpsv2.1,pickscore,aesthetic", "mean", [(0, 1, 0)]),
    ("hpsv2.1", "max", [(0, 1, 0), (0, 2, 0)]),
    ("hpsv2.1,pickscore,aesthetic", "max", [(0, 1, 0)]),
])
def test_dominance_keeps_rewrites_that_beat_the_reference_on_every_reward(tmp_path, rewards, reference, expected):
    candidates = make_candidates(tmp_path / "c", {0: GROUP_0})
    rows = run_filter(candidates, tmp_path / "f", "--filter_rewards", rewards, "--reference", reference,
                      "--weighting", "uniform")
    assert kept_names(rows) == expected
    assert all(row["weight"] == 1.0 for row in rows.values())


def test_advantage_and_weight_values(tmp_path):
    candidates = make_candidates(tmp_path / "c", {0: GROUP_0, 1: GROUP_1})
    rows = run_filter(candidates, tmp_path / "f")
    advantages = hand_advantages([scores for _, _, scores in GROUP_0], [1, 1, 1])
    row = rows["000000_v01_i00.png"]
    assert row["advantage"] == pytest.approx(advantages[2], abs=1e-6) and row["weight"] == row["advantage"] > 0
    assert rows["000001_v01_i00.png"]["weight"] == pytest.approx(1.0, abs=1e-6)  # z = (-1, +1) by hand
    assert row["text"] == "prompt 0" and row["rewrite"] == "prompt 0, rewrite 1"  # caption: the original prompt
    assert row["hpsv2.1"] == 0.30 and row["source_file"] == str(candidates / "000000_v01_i00.png")

    clipped = run_filter(candidates, tmp_path / "clipped", "--weight_clip", 0.5)
    assert {r["weight"] for r in clipped.values()} == {0.5}
    capped = run_filter(candidates, tmp_path / "capped", "--max_samples", 1)
    assert advantages[2] > 1.0  # group 0's kept image, by hand (1.475); group 1's has A = +1: the cap keeps 0's
    assert list(capped) == ["000000_v01_i00.png"]
    expanded = run_filter(candidates, tmp_path / "expanded", "--caption", "expanded")
    assert expanded["000000_v01_i00.png"]["text"] == "prompt 0, rewrite 1"


def test_margin_is_in_group_standard_deviations(tmp_path):
    # one reward: original 0, rewrites 1 and 3; population std of (0, 1, 3) = 1.2472
    group = [(0, 0, (0.0,)), (1, 0, (1.0,)), (2, 0, (3.0,))]
    candidates = make_candidates(tmp_path / "c", {0: group}, names=["hpsv2.1"])
    flags = ("--filter_rewards", "hpsv2.1", "--weighting", "uniform")
    assert kept_names(run_filter(candidates, tmp_path / "a", *flags, "--margin", 0.8)) == [(0, 1, 0), (0, 2, 0)]
    assert kept_names(run_filter(candidates, tmp_path / "b", *flags, "--margin", 0.81)) == [(0, 2, 0)]


def test_require_all_variants_single_image_groups_and_zero_variance(tmp_path):
    groups = {0: GROUP_0, 1: GROUP_1, 2: [(0, 0, (0.3, 20.0, 5.0))],  # a lone original: nothing to compare
              3: [(0, 0, (0.3, 20.0, 5.0)), (1, 0, (0.3, 20.0, 5.0))]}  # a tie is not a win
    candidates = make_candidates(tmp_path / "c", groups)
    assert kept_names(run_filter(candidates, tmp_path / "a")) == [(0, 1, 0), (1, 1, 0)]
    rows = run_filter(candidates, tmp_path / "b", "--require_all_variants")
    assert kept_names(rows) == [(1, 1, 0)]  # group 0 has failing rewrites
    report = json.loads((tmp_path / "b" / "crf_report.json").read_text())
    assert report["dropped_by_require_all_variants"] == 1 and report["groups"] == 4

    # the lone image and the tied pair have A = 0: kept by --mode none (weight 1); the best image of each group
    # under --mode topk gets weight max(A, 0) = 0 there, so advantage weighting leaves them out
    everything = run_filter(candidates, tmp_path / "c1", "--mode", "none")
    assert len(everything) == 11 and all(r["weight"] == 1.0 for r in everything.values())
    assert everything["000002_v00_i00.png"]["advantage"] == 0.0 == everything["000003_v01_i00.png"]["advantage"]
    top = run_filter(candidates, tmp_path / "c2", "--mode", "topk")
    assert [r["group_id"] for r in top.values()] == [0, 1]
    assert json.loads((tmp_path / "c2" / "crf_report.json").read_text())["zero_advantage"] == 2
    top_uniform = run_filter(candidates, tmp_path / "c3", "--mode", "topk", "--weighting", "uniform")
    assert [r["group_id"] for r in top_uniform.values()] == [0, 1, 2, 3]


def test_topk_with_reward_weights(tmp_path):
    # a = 1, 2, 3 and b = 3, 2, 1: equal weights cancel (A = 0 for all); weights 2,1 give A = z(a)
    group = [(0, i, (float(i + 1), float(3 - i))) for i in range(3)]
    candidates = make_candidates(tmp_path / "c", {0: group}, names=["hpsv2.1", "pickscore"])
    flags = ("--mode", "topk", "--filter_rewards", "hpsv2.1,pickscore")
    with pytest.raises(SystemExit, match="no image of .* passed the filter"):
        run_filter(candidates, tmp_path / "a", *flags)
    rows = run_filter(candidates, tmp_path / "b", *flags, "--reward_weights", "2,1")
    assert list(rows) == ["000000_v00_i02.png"]
    assert rows["000000_v00_i02.png"]["weight"] == pytest.approx(math.sqrt(1.5), abs=1e-6)
    rows = run_filter(candidates, tmp_path / "k", *flags, "--reward_weights", "2,1", "--top_k", 2, "--weighting",
                      "uniform")
    assert kept_names(rows) == [(0, 0, 1), (0, 0, 2)]


def test_pairs_are_each_groups_best_against_its_worst_by_advantage(tmp_path):
    from datasets import load_dataset

    tied = [(0, 0, (0.3, 20.0, 5.0)), (1, 0, (0.3, 20.0, 5.0))]  # equal advantages: no pair
    candidates = make_candidates(tmp_path / "c", {0: GROUP_0, 1: GROUP_1, 3: tied})
    rows = run_filter(candidates, tmp_path / "p", "--mode", "pairs")
    advantages = hand_advantages([scores for _, _, scores in GROUP_0], [1, 1, 1])
    names = [f"000000_v{variant:02d}_i{index:02d}.png" for variant, index, _ in GROUP_0]
    best, worst = names[int(np.argmax(advantages))], names[int(np.argmin(advantages))]
    assert (best, worst) == ("000000_v01_i00.png", "000000_v00_i00.png")  # by hand: A = +1.47 and -1.71
    assert set(rows) == {best, "000001_v01_i00.png"}
    pair = rows[best]
    assert pair["rejected_file_name"] == worst and pair["text"] == "prompt 0"
    assert pair["advantage_gap"] == pytest.approx(advantages.max() - advantages.min(), abs=1e-6)
    assert pair["rejected_scores"] == dict(zip(NAMES, GROUP_0[0][2])) and "weight" not in pair  # not a CRAFT set
    assert rows["000001_v01_i00.png"]["rejected_file_name"] == "000001_v00_i00.png"
    assert rows["000001_v01_i00.png"]["advantage_gap"] == pytest.approx(2.0, abs=1e-6)  # z = -1, +1
    report = json.loads((tmp_path / "p" / "crf_report.json").read_text())
    assert report["groups_without_pair"] == 1 and report["kept"] == 2

    dataset = load_dataset("imagefolder", data_dir=str(tmp_path / "p"), split="train")
    assert len(dataset) == 2 and {"image", "rejected", "text", "advantage_gap"} <= set(dataset.column_names)
    first = [row for row in dataset if row["advantage_gap"] > 2][0]
    assert first["rejected"].getpixel((0, 0)) == Image.open(candidates / worst).getpixel((0, 0))

    capped = run_filter(candidates, tmp_path / "capped", "--mode", "pairs", "--max_samples", 1)
    assert list(capped) == [best]  # the larger gap (3.18 > 2)
    for flag in (("--caption", "expanded"), ("--weighting", "uniform"), ("--margin", "0.5")):
        with pytest.raises(SystemExit):
            crf_filter.parse_args(["--candidates_dir", str(candidates), "--mode", "pairs", *flag])


def test_output_is_an_imagefolder_with_a_report_and_preview(tmp_path):
    from datasets import load_dataset

    candidates = make_candidates(tmp_path / "c", {0: GROUP_0, 1: GROUP_1})
    run_filter(candidates, tmp_path / "f", "--link")
    dataset = load_dataset("imagefolder", data_dir=str(tmp_path / "f"), split="train")
    assert len(dataset) == 2
    assert {"image", "text", "weight", "advantage", "group_id", "source_file", *NAMES} <= set(dataset.column_names)
    assert (tmp_path / "f" / "000000_v01_i00.png").stat().st_ino == (candidates / "000000_v01_i00.png").stat().st_ino
    report = json.loads((tmp_path / "f" / "crf_report.json").read_text())
    assert report["candidates"] == 8 and report["rewrite_images"] == 5 and report["kept"] == 2
    assert report["passed"] == {"hpsv2.1": 4, "pickscore": 4, "aesthetic": 4, "hpsv2.1+pickscore": 3,
                                "hpsv2.1+aesthetic": 3, "pickscore+aesthetic": 3, "hpsv2.1+pickscore+aesthetic": 2}
    width, height = Image.open(tmp_path / "f" / "crf_preview.png").size  # the prompts' column, original, kept
    assert width == 3 * 192 and height > 2 * 192
    assert set(cu.read_jsonl(candidates / "rewards.jsonl")[0]) == {"file_name", *NAMES}  # candidates untouched


def test_refuses_to_overwrite(tmp_path):
    candidates = make_candidates(tmp_path / "c", {1: GROUP_1})
    run_filter(candidates, tmp_path / "f")
    with pytest.raises(SystemExit, match="is not empty; pass --overwrite"):
        run_filter(candidates, tmp_path / "f", "--weighting", "uniform")
    assert cu.read_jsonl(tmp_path / "f" / "metadata.jsonl")[0]["weight"] == pytest.approx(1.0, abs=1e-6)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="holds no crf_report.json"):
        run_filter(candidates, tmp_path / "mine", "--overwrite")
    run_filter(candidates, tmp_path / "f", "--overwrite", "--mode", "none")
    assert len(cu.read_jsonl(tmp_path / "f" / "metadata.jsonl")) == 2


def test_bad_inputs(tmp_path, zoo):
    candidates = make_candidates(tmp_path / "c", {0: GROUP_0, 1: GROUP_1, 2: [(1, 0, (0.3, 20.0, 5.0))]})
    with pytest.raises(SystemExit, match="group 2 has no original-prompt image"):
        run_filter(candidates, tmp_path / "a")
    run_filter(candidates, tmp_path / "b", "--skip_invalid")
    assert json.loads((tmp_path / "b" / "crf_report.json").read_text())["skipped"]["group_without_original"] == 1

    # a reward not in rewards.jsonl is scored first; with weights that are not there, one clear error
    with pytest.raises(SystemExit, match="--clip_model .*nope: could not load"):
        run_filter(candidates, tmp_path / "c5", "--filter_rewards", "clip", "--clip_model", tmp_path / "nope",
                   "--skip_invalid")
    assert not (tmp_path / "c5").exists()
    rewards = cu.read_jsonl(candidates / "rewards.jsonl")
    rewards[3]["pickscore"] = float("nan")
    cu.write_jsonl_atomic(candidates / "rewards.jsonl", rewards)
    with pytest.raises(SystemExit, match=r"row 4: pickscore score is nan in .*rewards.jsonl; fix it or pass"):
        run_filter(candidates, tmp_path / "c2", "--filter_rewards", "pickscore", "--mode", "topk")
    (candidates / "000000_v02_i00.png").unlink()
    with pytest.raises(SystemExit, match=r"row 5: image 000000_v02_i00.png is missing"):
        run_filter(candidates, tmp_path / "c3", "--filter_rewards", "hpsv2.1", "--mode", "topk")
    with pytest.raises(SystemExit, match="--filter_rewards: unknown reward hps; valid"):
        run_filter(candidates, tmp_path / "c4", "--filter_rewards", "hps")


def test_end_to_end_from_tiny_model_candidates(zoo, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green star\n")
    run_script("generate_candidates.py", "--pretrained_model_name_or_path", zoo / "sd15", "--prompts_file",
               tmp_path / "prompts.txt", "--output_dir", tmp_path / "candidates", "--num_inference_steps", 2,
               "--num_variants", 3, "--num_images_per_prompt", 2)
    result = run_script("crf_filter.py", "--candidates_dir", tmp_path / "candidates", "--output_dir",
                        tmp_path / "filtered", "--filter_rewards", "jpeg,hpsv2.1", *reward_flags(zoo))
    assert "scoring jpeg, hpsv2.1 first" in result.stdout
    scores = {r["file_name"]: r for r in cu.read_jsonl(tmp_path / "candidates" / "rewards.jsonl")}
    assert len(scores) == 24 and all({"jpeg", "hpsv2.1"} <= set(r) for r in scores.values())
    metadata = {r["file_name"]: r for r in cu.read_jsonl(tmp_path / "candidates" / "metadata.jsonl")}
    kept = cu.read_jsonl(tmp_path / "filtered" / "metadata.jsonl")
    for row in kept:  # every kept image beats its group's mean original-prompt scores on both rewards
        group = [f for f, m in metadata.items() if m["group_id"] == row["group_id"] and m["variant_id"] == 0]
        for name in ("jpeg", "hpsv2.1"):
            assert row[name] > np.mean([scores[f][name] for f in group])
        assert row["weight"] > 0 and row["text"] == metadata[row["file_name"]]["original_prompt"]
    report = json.loads((tmp_path / "filtered" / "crf_report.json").read_text())
    assert report["kept"] == len(kept) and report["rewrite_images"] == 18


@pytest.mark.parametrize("case", ["truncated_png", "png_without_end", "no_file_name", "no_original_prompt",
                                  "no_text", "output_is_a_file"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    candidates = make_candidates(tmp_path / "c", {0: GROUP_0, 1: GROUP_1})
    metadata = candidates / "metadata.jsonl"
    out = tmp_path / "f"
    expected = {
        # the kept image of group 0 (row 3); its scores are already cached, so only the copy would read it
        "truncated_png": f"{metadata}, row 3: cannot read image {candidates}/000000_v01_i00.png",
        "png_without_end": f"{metadata}, row 3: cannot read image {candidates}/000000_v01_i00.png",
        "no_file_name": f"{metadata}, row 2: no 'file_name' column",
        "no_original_prompt": f"{metadata}, row 2: no 'original_prompt' column",
        "no_text": f"{metadata}, row 2: no 'text' column",
        "output_is_a_file": f"--output_dir {out} is a file; give a folder",
    }[case]
    image = candidates / "000000_v01_i00.png"
    if case == "truncated_png":
        Image.new("RGB", (64, 64), (9, 99, 199)).save(image)
        image.write_bytes(image.read_bytes()[:-40])  # the pixel data ends early
    elif case == "png_without_end":
        image.write_bytes(image.read_bytes()[:-12])  # only the IEND chunk is gone
    elif case == "output_is_a_file":
        out.write_text("mine")
    else:
        rows = cu.read_jsonl(metadata)
        del rows[1][case[3:]]
        cu.write_jsonl_atomic(metadata, rows)
    result = run_script("crf_filter.py", "--candidates_dir", candidates, "--output_dir", out, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {expected}")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["c", "f"] if case == "output_is_a_file" else ["c"])


def folder_contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kill_at", ["crf_writing", "swap_ready", "swap_old_aside", "swap_new_in"])
def test_killed_overwrite_loses_nothing_and_a_rerun_finishes_it(tmp_path, kill_at):
    """--overwrite replaces a finished set; killed (-9) while writing or at any point of the swap, the folder is the
    old set or the new one, whole, and a rerun leaves exactly what an uninterrupted run writes, with no leftovers."""
    candidates = make_candidates(tmp_path / "c", {0: GROUP_0, 1: GROUP_1})
    flags = ("--candidates_dir", candidates, "--output_dir", tmp_path / "f")
    run_script("crf_filter.py", *flags, "--mode", "none")
    old = folder_contents(tmp_path / "f")
    run_script("crf_filter.py", "--candidates_dir", candidates, "--output_dir", tmp_path / "straight",
               fresh_interpreter=True)  # other string hashing than the runs it must equal
    new = folder_contents(tmp_path / "straight")
    assert len(cu.read_jsonl(tmp_path / "f" / "metadata.jsonl")) == 8 and len(new) == 5  # 2 images + 3 files

    run_script("crf_filter.py", *flags, "--overwrite", kill_at=kill_at)
    if (tmp_path / "f").exists():
        assert folder_contents(tmp_path / "f") in (old, new)
    else:  # killed between the two renames: the new set waits, whole, beside it
        assert kill_at == "swap_old_aside"
    run_script("crf_filter.py", *flags, "--overwrite")
    assert folder_contents(tmp_path / "f") == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "f", "straight"]  # no hidden leftovers


def test_a_labelled_grid_shows_its_tiles_row_and_column_labels_and_captions():
    """Tiles land where the labels leave room for them, scaled to the tile size; the row labels, column labels
    and captions are drawn in their bands (dark pixels on white), and a short row leaves its cells white."""
    import numpy as np

    colours = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255)]]
    tiles = [[Image.new("RGB", (8, 8), colour) for colour in row] for row in colours]
    grid = np.asarray(cu.labelled_grid(tiles, ["a red and a green", "a blue"], ["seed 1", "seed 2"],
                                       [["r 1.0", "g\n2.0"], ["b 3.0"]], tile_size=64))
    top = (grid[:, 64] == (255, 0, 0)).all(axis=1).argmax()  # the first tile's first line, below the column labels
    under = (grid[:, 64] == (0, 0, 255)).all(axis=1).argmax() - top - 64  # the band of captions under a row
    assert grid.shape == (top + 2 * (64 + under), 64 + 2 * 64, 3) and top > 0 and under > 0
    for r, row in enumerate(colours):
        y = top + r * (64 + under)
        for c, colour in enumerate(row):
            assert (grid[y: y + 64, 64 + 64 * c: 128 + 64 * c] == colour).all()
            assert (grid[y + 64: y + 64 + under, 64 + 64 * c: 128 + 64 * c] < 128).any()  # its caption
        assert (grid[y: y + 64, :64] < 128).any()  # the row's label
    assert (grid[:top, 64:128] < 128).any() and (grid[:top, 128:] < 128).any()  # both column labels
    assert (grid[top + 64 + under: top + 128 + under, 128:] == 255).all()  # the short row's empty cell
