"""Plumbing shared by the CRAFT scripts: the folder contract, crash-safe files, prompts and seeds, generation folders.

Each script is one stage and reads top to bottom; what two or more of them need lives here.
"""

import contextlib
import csv
import errno
import glob
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile

GENERATION_CONFIG = "generation_config.json"
METADATA = "metadata.jsonl"
PROGRESS_DIR = ".progress"  # hidden, so load_dataset("imagefolder") never sees the per-process logs


def fail(message):
    """Stop with one clear line (no traceback): what is wrong, where, and what to do. Open progress bars are closed
    first, so that the line is the last one printed."""
    progress = sys.modules.get("tqdm.std")
    for bar in list(getattr(progress.tqdm, "_instances", [])) if progress else []:
        bar.close()
    raise SystemExit(f"error: {message}")


# Writes the system refuses, and what to tell the user; the rerun goes on from what was saved (every write is atomic).
WRITE_FAULTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "a file would pass the size this system allows (ulimit -f)",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}


def write_fault(error):
    """-> (errno or None, path or None) when `error`, or what caused it, is a write the system refused: an OSError,
    a Rust library's "os error N" (safetensors), or torch.save's failed stream; else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in WRITE_FAULTS:
            return error.errno, error.filename
        match = re.search(r"os error (\d+)\)", str(error))
        if match and int(match.group(1)) in WRITE_FAULTS:
            return int(match.group(1)), None
        if isinstance(error, RuntimeError) and "inline_container" in str(error):  # torch.save's writer
            return None, None
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def write_faults_in_one_line(folder):
    """A full disk, a read-only folder or a refused permission, wherever it strikes in a stage, ends the run in one
    line naming the file (or the stage's output folder) and what to do."""
    try:
        yield
    except Exception as error:
        fault = write_fault(error)
        if fault is None:
            raise
        number, path = fault
        reason = WRITE_FAULTS.get(number, "a write failed (a full disk or a read-only folder?)")
        fail(f"{path or folder}: {reason}; free space or fix the permissions, then rerun the same command: it goes "
             "on from what was saved")


_fault_points_reached = {}


def fault_point(name):
    """The kill tests stop the process here, as kill -9 would, to prove that a kill loses nothing:
    CRAFT_KILL_AT=name kills it the first time it gets here, CRAFT_KILL_AT=name#n the n-th time."""
    wanted = os.environ.get("CRAFT_KILL_AT")
    if not wanted:
        return
    _fault_points_reached[name] = _fault_points_reached.get(name, 0) + 1
    if wanted in (name, f"{name}#{_fault_points_reached[name]}"):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------------
# Crash-safe files: a reader never sees half a file, an append-only log never keeps half a row.


def umask_mode(mode):
    """`mode` as the user's umask allows (mkstemp/mkdtemp create private 0600/0700 files otherwise)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_atomic(path, write):
    """`write(file)` into a temp file beside `path`, then a rename: a reader never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.chmod(tmp, umask_mode(0o666))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()))


def write_jsonl_atomic(path, rows):
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    write_atomic(path, lambda f: f.write(payload))


def write_text_atomic(path, text):
    write_atomic(path, lambda f: f.write(text.encode()))


_claimed = {}  # (device, inode) of each folder this process claimed -> its locked descriptor, open until the end


def claim_folder(folder):
    """Hold the folder's OS lock (flock on the folder itself) until this process ends: a second run writing into it
    stops here in one line instead of mixing its files with this one's."""
    import fcntl

    key = (os.stat(folder).st_dev, os.stat(folder).st_ino)
    if key in _claimed:
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        fail(f"{folder} is being written by another run right now; wait for it to end, or choose another folder")
    _claimed[key] = descriptor


@contextlib.contextmanager
def folder_lock(folder):
    """An OS lock (flock) on the folder itself, held for the block: writers of a shared file in it take turns, so two
    runs never write back what the other has not seen; no lock file is left behind."""
    import fcntl

    if (os.stat(folder).st_dev, os.stat(folder).st_ino) in _claimed:  # this process holds it already
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def remove_temp_files(folder):
    """The temp files of atomic writes that a kill interrupted (`.tmp-*` is this pack's prefix)."""
    for leftover in glob.glob(os.path.join(glob.escape(folder), ".tmp-*")):
        os.remove(leftover)


def save_image_atomic(image, path):
    image_format = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(os.path.splitext(path)[1].lower(), "PNG")
    write_atomic(path, lambda f: image.save(f, format=image_format))


def read_text(path):
    """A text file's contents; UTF-8 (a byte-order mark is dropped), anything else is refused in one line."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as error:
        fail(f"{path} is not UTF-8 text (byte {error.start} is {error.object[error.start:error.start + 1]!r}); "
             "save it as UTF-8")


def read_jsonl(path, allow_torn_tail=False):
    """Rows of a jsonl file. A torn last line (a writer killed mid-append) is dropped when allowed."""
    lines = read_text(path).replace("\r\n", "\n").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if allow_torn_tail and number == len(lines):
                break
            fail(f"{path}, line {number}: not valid JSON; fix or remove that line")
    return rows


class AppendLog:
    """One process's append-only jsonl log. Rows are fsync'ed, so a row on disk is a finished piece of work."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):  # drop a torn last line left by a kill
            with open(path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        self.file = open(path, "a", encoding="utf-8")

    def append(self, rows):
        self.file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def _swap_names(destination):
    parent, name = os.path.split(os.path.abspath(destination))
    return parent, name, os.path.join(parent, f".{name}.new"), os.path.join(parent, f".{name}.old")


def staging_folder(destination):
    """A new hidden folder beside `destination` to build its replacement in; what a killed run left is cleared."""
    parent, name, _, _ = _swap_names(destination)
    recover_folder(destination)
    os.makedirs(parent, exist_ok=True)
    folder = tempfile.mkdtemp(dir=parent, prefix=f".{name}.staging-")
    os.chmod(folder, umask_mode(0o777))
    return folder


def publish_folder(staging, destination):
    """Put a finished folder in the place of `destination`. The old folder stays whole until the new one is in; a
    kill at any point leaves either, and recover_folder (the next run) completes the swap."""
    _, _, new, old = _swap_names(destination)
    os.replace(staging, new)  # from here on the new folder is complete
    fault_point("swap_ready")
    if os.path.exists(destination):
        os.replace(destination, old)
    fault_point("swap_old_aside")
    os.replace(new, destination)
    fault_point("swap_new_in")
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(destination):
    """Complete a swap that a kill interrupted, and delete the staging folders of killed runs (only ours)."""
    parent, name, new, old = _swap_names(destination)
    if os.path.isdir(new):
        if os.path.exists(destination) and not os.path.exists(old):
            os.replace(destination, old)
        if not os.path.exists(destination):
            os.replace(new, destination)
            print(f"{destination}: completed the replacement that an interrupted run had left half done")
    if os.path.isdir(old) and os.path.exists(destination):
        shutil.rmtree(old)
    for leftover in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.staging-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def move_entries_in(ready, folder):
    """Move every entry of `ready` (a complete hidden folder) into `folder`, replacing what is there, then remove
    `ready`. Called again after a kill, it finishes the moves."""
    for name in sorted(os.listdir(ready)):
        target = os.path.join(folder, name)
        if os.path.isdir(target):  # e.g. a pipeline's unet/ from an earlier run
            shutil.rmtree(target)
        os.replace(os.path.join(ready, name), target)
        fault_point("entry_moved")
    os.rmdir(ready)


def read_logged_rows(output_dir, final_name, log_prefix):
    """Rows of a finished file plus every process's progress log (a resumed run may use another process count)."""
    rows = []
    if os.path.exists(os.path.join(output_dir, final_name)):
        rows += read_jsonl(os.path.join(output_dir, final_name))
    for log in sorted(glob.glob(os.path.join(output_dir, PROGRESS_DIR, f"{log_prefix}-*.jsonl"))):
        rows += read_jsonl(log, allow_torn_tail=True)
    return rows


def merge_logged_rows(output_dir, final_name, log_prefix, key, sort_key):
    """Fold the progress logs into the final file (deduplicated, sorted), then remove the logs. Main process only."""
    unique = {key(row): row for row in read_logged_rows(output_dir, final_name, log_prefix)}
    rows = sorted(unique.values(), key=sort_key)
    write_jsonl_atomic(os.path.join(output_dir, final_name), rows)
    fault_point("logs_merged")
    for log in glob.glob(os.path.join(output_dir, PROGRESS_DIR, f"{log_prefix}-*.jsonl")):
        os.remove(log)
    if not os.listdir(os.path.join(output_dir, PROGRESS_DIR)):
        os.rmdir(os.path.join(output_dir, PROGRESS_DIR))
    return rows


def process_state():
    """accelerate's process info. PartialState ignores `accelerate launch --cpu` (ACCELERATE_USE_CPU) unless told."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def path_in_folder(folder, name, where, column="file_name"):
    """The path of a file that a row of a folder's metadata names: relative, and inside `folder` once `..` and
    symlinks are resolved, else one line naming the row. Folders come from other people (a downloaded dataset, a
    shared candidates folder): a row must not read, copy or overwrite anything outside them."""
    if not isinstance(name, str) or not name.strip():
        fail(f"{where}: no '{column}'; each row names its image file")
    path = os.path.join(folder, name)
    root = os.path.realpath(folder)
    if os.path.isabs(name) or os.path.commonpath([root, os.path.realpath(path)]) != root:
        fail(f"{where}: {column} {name!r} is outside {folder}; a row may only name a file inside its folder")
    return path


def check_pipeline_folder(path, index):
    """A local pipeline folder holds every component its model_index.json (`index`) names: refuse, in one line, a
    folder copied without one (the loader's own error would name a config key instead)."""
    if not os.path.isdir(path):
        return
    for name, value in index.items():
        if isinstance(value, list) and len(value) == 2 and value[1] and not os.path.isdir(os.path.join(path, name)):
            fail(f"{os.path.join(path, name)}/ is missing: model_index.json names a {value[1]} there; copy the whole "
                 "pipeline folder, or give its Hub id")


def refuse_repeated_rows(rows, metadata, columns=("file_name",)):
    """A file named by two rows would count twice (scored twice, a group's reference twice, trained twice as
    strongly): refuse, in one line naming both rows."""
    first = {}
    for number, row in enumerate(rows, start=1):
        for column in columns:
            name = row.get(column) if isinstance(row, dict) else None
            if isinstance(name, str) and first.setdefault(name, number) != number:
                fail(f"{metadata}, rows {first[name]} and {number}: both name {name!r}; remove the repeated row")


def open_image(path, where):
    """The decoded RGB image, or one line naming the row (`where`) that points at a missing, truncated or
    non-image file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here
    except Exception as error:  # PIL raises many types
        fail(f"{where}: cannot read image {path} ({type(error).__name__}); fix or remove that row")


def check_image(path, where, decode=True):
    """Refuse a bad image up front: its structure (chunks, checksums, end marker) and, with `decode`, its pixels.
    Scoring a large folder checks the structure up front and decodes once, when it scores (open_image)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types
        fail(f"{where}: cannot read image {path} ({type(error).__name__}); fix or remove that row")
    if decode:
        open_image(path, where)


# ----------------------------------------------------------------------------------------------------------------
# Prompts and seeds


def add_prompt_args(parser):
    group = parser.add_argument_group("prompts")
    group.add_argument("--prompts_file",
                       help="a .txt (one prompt per line), .jsonl, .csv or .json file of prompts; a .json file is an "
                            "array of strings, or of objects holding --prompt_column (HPDv2's train.json as it is)")
    group.add_argument("--dataset_name", help="a Hugging Face dataset (Hub id or local folder) holding prompts")
    group.add_argument("--dataset_split", default="train", help="split of --dataset_name")
    group.add_argument("--prompt_column", default="prompt", help="column of the prompts in .jsonl/.csv/datasets")
    group.add_argument("--max_prompts", type=int, help="use at most this many prompts (after de-duplication)")
    group.add_argument(
        "--shuffle_prompts", action="store_true",
        help="shuffle the prompts with --seed before --max_prompts takes its subset",
    )


def _column(rows, column, source):
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or column not in row:
            where = source if number == 1 else f"{source}, row {number}"
            columns = ", ".join(row) if isinstance(row, dict) else f"a {type(row).__name__}"
            fail(f"{where} has no column '{column}' (columns: {columns}); set --prompt_column")
    return _text_values([row[column] for row in rows], source, "row")


def _text_values(values, source, unit):
    """The prompts as they are: text, or null for a row without one; anything else is refused, naming its row."""
    for number, value in enumerate(values, start=1):
        if value is not None and not isinstance(value, str):
            fail(f"{source}, {unit} {number}: the prompt {value!r} is not text; fix that {unit}")
    return values


def _json_prompts(source, column):
    """A JSON array of prompt strings (HPSv2's benchmark files) or of records (HPDv2's train.json)."""
    try:
        data = json.loads(read_text(source))
    except json.JSONDecodeError as error:
        fail(f"{source}, line {error.lineno}: not valid JSON ({error.msg}); fix the file")
    if not isinstance(data, list):
        fail(f"{source} holds a JSON {type(data).__name__}; a .json prompts file is an array of strings or of objects")
    if any(isinstance(item, str) for item in data):  # an array of strings
        return _text_values(data, source, "item")
    return _column(data, column, source)


def load_prompts(args):
    """Prompts from --prompts_file or --dataset_name: stripped, empty ones dropped, duplicates removed, in order."""
    if bool(args.prompts_file) == bool(args.dataset_name):
        fail("give exactly one of --prompts_file and --dataset_name")
    if args.max_prompts is not None and args.max_prompts < 1:
        fail(f"--max_prompts must be at least 1 (got {args.max_prompts}); leave it out to use every prompt")
    if args.prompts_file:
        source = args.prompts_file
        if not os.path.isfile(source):
            fail(f"prompts file {source} does not exist")
        extension = os.path.splitext(source)[1].lower()
        if extension == ".jsonl":
            prompts = _column(read_jsonl(source), args.prompt_column, source)
        elif extension == ".json":
            prompts = _json_prompts(source, args.prompt_column)
        elif extension == ".csv":
            prompts = _column(list(csv.DictReader(io.StringIO(read_text(source)))), args.prompt_column, source)
        else:
            prompts = read_text(source).splitlines()
    else:
        from datasets import load_dataset

        source = f"dataset {args.dataset_name} (split {args.dataset_split})"
        try:
            dataset = load_dataset(args.dataset_name, split=args.dataset_split)
        except Exception as error:  # datasets raises many types; the user needs the message, not the trace
            fail(f"could not load {source}: {str(error).splitlines()[0]}")
        if args.prompt_column not in dataset.column_names:
            fail(f"{source} has no column '{args.prompt_column}' (columns: {', '.join(dataset.column_names)}); "
                 "set --prompt_column")
        prompts = _text_values(dataset[args.prompt_column], source, "row")
    if None in prompts:
        print(f"{source}: left out {prompts.count(None)} row(s) without a prompt (null)", file=sys.stderr)
    prompts = list(dict.fromkeys(p.strip() for p in prompts if p is not None and p.strip()))
    if not prompts:
        fail(f"{source} holds no prompts")
    if args.shuffle_prompts:
        random.Random(args.seed).shuffle(prompts)
    return prompts[: args.max_prompts] if args.max_prompts else prompts


def sha256_of(obj):
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def derive(*parts):
    """A 31-bit seed from any tuple: the randomness of a sample or a step depends only on what it is."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def derive_seed(seed, group_id, variant_id, image_index):
    """An image's seed depends only on what the image is, never on batching or on the process that makes it."""
    return derive(seed, group_id, variant_id, image_index)


# ----------------------------------------------------------------------------------------------------------------
# Generation folders: the settings they were made with, resume and --overwrite (craft_generation.py makes the images)

TORCH_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


# What the stages write into a generation folder: its images (image_file_name), records, rewards and their reports.
GENERATION_IMAGE = re.compile(r"\d{6}_v\d{2}_i\d{2}\.png$")
GENERATION_FILES = re.compile(rf"({GENERATION_IMAGE.pattern[:-1]}|generation_config\.json|metadata\.jsonl|"
                              r"expansions\.jsonl|rewards\.jsonl|rewards_summary\.(json|md)|rewards_hist\.png)$")
GENERATION_STAGE = {True: "generate_candidates.py", False: "eval_rewards.py"}  # by whether rewrites are recorded


def refuse_foreign_entries(folder, ours, flag):
    """`flag` (an overwrite) replaces only what the pack wrote: refuse, in one line, a folder that holds anything
    else. `ours(name)`: whether the pack wrote that entry; hidden entries are the pack's own bookkeeping."""
    foreign = sorted(name for name in os.listdir(folder) if not name.startswith(".") and not ours(name))
    if foreign:
        fail(f"{flag} replaces only what this pack wrote, and {folder} also holds {', '.join(foreign[:3])}"
             f"{' ...' if len(foreign) > 3 else ''}: move those away, or choose another --output_dir")


def check_generation_folder(output_dir, settings, overwrite):
    """Refuse to mix settings in one folder, or to write into a folder that is not ours. True = start over."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        fail(f"--output_dir {output_dir} is a file; give a folder")
    config_path = os.path.join(output_dir, GENERATION_CONFIG)
    if os.path.exists(config_path):
        previous = recorded_settings(output_dir)
        made_by, now = (GENERATION_STAGE["num_variants" in recorded] for recorded in (previous, settings))
        if made_by != now:
            fail(f"{output_dir} was made by {made_by}; {now} writes only into its own folders: choose another "
                 "--output_dir")
        changed = [k for k in sorted(set(previous) | set(settings)) if previous.get(k) != settings.get(k)]
        if changed and not any(GENERATION_IMAGE.match(name) for name in os.listdir(output_dir)):
            print(f"{output_dir}: no image was made with its earlier settings; starting over with these")
            return True
        if changed and overwrite:
            refuse_foreign_entries(output_dir, GENERATION_FILES.match, "--overwrite")
        if changed and not overwrite:
            first = changed[0]
            aside = previous_generation(output_dir)
            fail(f"{output_dir} holds images made with other settings ({first}: {previous.get(first)!r} there, "
                 f"{settings.get(first)!r} now; {len(changed)} setting(s) differ); rerun with the same settings to "
                 "resume, choose another --output_dir, or pass --overwrite to start over"
                 + (f" (the run that one replaces is kept in {aside}; --overwrite with its settings brings it back)"
                    if os.path.exists(aside) else ""))
        return bool(changed)
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        fail(f"{output_dir} is not empty and holds no {GENERATION_CONFIG}; choose an empty --output_dir")
    return False


def previous_generation(output_dir):
    """Where --overwrite keeps a folder's previous run until the new one completes."""
    return _swap_names(output_dir)[3]


def generation_complete(output_dir):
    """Every planned image made and logged: metadata.jsonl merged and no progress log left."""
    return os.path.isfile(os.path.join(output_dir, METADATA)) and \
        not glob.glob(os.path.join(output_dir, PROGRESS_DIR, "*.jsonl"))


def recorded_settings(output_dir):
    with open(os.path.join(output_dir, GENERATION_CONFIG), encoding="utf-8") as f:
        return json.load(f)["settings"]


def image_file_name(group_id, variant_id, image_index):
    return f"{group_id:06d}_v{variant_id:02d}_i{image_index:02d}.png"


def plan_images(groups, num_images_per_prompt, seed):
    """One metadata row per image to make. groups: [(original_prompt, [prompt texts, variant 0 first])]."""
    rows = []
    for group_id, (original_prompt, texts) in enumerate(groups):
        for variant_id, text in enumerate(texts):
            for image_index in range(num_images_per_prompt):
                rows.append({
                    "file_name": image_file_name(group_id, variant_id, image_index), "text": text,
                    "original_prompt": original_prompt, "group_id": group_id, "variant_id": variant_id,
                    "image_index": image_index, "seed": derive_seed(seed, group_id, variant_id, image_index),
                })
    return rows


def image_sort_key(row):
    return row["group_id"], row["variant_id"], row["image_index"]

