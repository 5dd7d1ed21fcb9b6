"""A folder's metadata names only files inside that folder: a row that points outside it ("../", an absolute path, a
symlink out of the folder) is refused in one line by every stage that reads, copies or links what rows name, before
anything is written, and the file outside is neither read into an output nor touched."""

import os

import pytest
from PIL import Image

import craft_utils as cu
from conftest import run_script
from make_tiny_models import make_pairs_set, make_training_set
from test_crf_filter import GROUP_0, make_candidates


def point_outside(folder, row_index, case, outside, column="file_name"):
    """Row `row_index` of folder's metadata made to name `outside` the way `case` says; -> the name written."""
    name = {"dotdot": "../outside.png", "absolute": str(outside), "symlink": "inside-looking.png"}[case]
    if case == "symlink":
        os.symlink(outside, folder / name)
    for table in ("metadata.jsonl", "rewards.jsonl"):  # its scores follow it: nothing is left to score first
        if (folder / table).exists() and (table == "metadata.jsonl" or column == "file_name"):
            rows = cu.read_jsonl(folder / table)
            rows[row_index][column] = name
            cu.write_jsonl_atomic(folder / table, rows)
    return name


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink"])
def test_a_row_naming_a_file_outside_its_folder_is_refused_by_every_stage(tmp_path, case):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside)
    before = (outside.read_bytes(), outside.stat().st_mtime_ns)

    def refused(script, *args, where, name, column="file_name", out=None):
        result = run_script(script, *args, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: {where}/metadata.jsonl, row 2: {column} {name!r} is outside {where}; a row may only name a file "
            "inside its folder")
        assert out is None or not out.exists()

    candidates = make_candidates(tmp_path / "candidates", {0: GROUP_0[:3]})
    name = point_outside(candidates, 1, case, outside)
    scores = (candidates / "rewards.jsonl").read_bytes()
    refused("crf_filter.py", "--candidates_dir", candidates, "--output_dir", tmp_path / "filtered",
            "--filter_rewards", "hpsv2.1", where=candidates, name=name, out=tmp_path / "filtered")
    refused("eval_rewards.py", "--images_dir", candidates, "--rewards", "jpeg", where=candidates, name=name)
    assert (candidates / "rewards.jsonl").read_bytes() == scores

    data = make_training_set(tmp_path / "data", n=3)
    name = point_outside(data, 1, case, outside)
    refused("train_craft_sd15.py", "--pretrained_model_name_or_path", "never/loaded", "--train_data_dir", data,
            "--output_dir", tmp_path / "out", where=data, name=name, out=tmp_path / "out")
    pairs = make_pairs_set(tmp_path / "pairs", n=3)
    name = point_outside(pairs, 1, case, outside, column="rejected_file_name")
    refused("train_craft_sdxl_lora.py", "--pretrained_model_name_or_path", "never/loaded", "--train_data_dir", pairs,
            "--loss", "dpo", "--output_dir", tmp_path / "out", where=pairs, name=name, column="rejected_file_name",
            out=tmp_path / "out")
    assert (outside.read_bytes(), outside.stat().st_mtime_ns) == before
