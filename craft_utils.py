"""Plumbing every CRAFT stage shares: one-line errors (also for a full disk or a read-only folder), crash-safe files
and folders, locks, the rows of a folder's metadata (paths kept inside it, each image checked), and seeds derived
from what a sample is. Each script is one stage and reads top to bottom; what two or more of them need lives here.
"""

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile

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


def announce_default_model(args, default, input_args):
    """The first line a stage prints when the user named no model: which one it loads, and the flag to choose."""
    given = any(arg.startswith("--pretrained_model_name_or_path") for arg in
                (sys.argv[1:] if input_args is None else map(str, input_args)))
    if not given and args.pretrained_model_name_or_path == default and os.environ.get("RANK", "0") == "0":
        print(f"model: {default}, the default (--pretrained_model_name_or_path chooses another)", flush=True)


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
    except OSError as error:  # a file system without flock on folders (some NFS and Lustre mounts)
        print(f"note: {folder} cannot be locked here ({error.strerror}): make sure no other run writes into it",
              file=sys.stderr)
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
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as error:  # a file system without flock on folders: the writers no longer take turns
            print(f"note: {folder} cannot be locked here ({error.strerror}): run one scorer at a time",
                  file=sys.stderr)
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


def labelled_grid(tiles, row_labels, column_labels=None, captions=None, tile_size=256):
    """A grid of images that says what it shows, readable at its saved size: tiles[r][c] (PIL images; rows may be
    shorter than others) scaled to tile_size, each row's label (wrapped) on its left, each column's label on top,
    and captions[r][c] (a few lines: the scores that matter) under each tile."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(12, tile_size // 16))
    line = font.getbbox("Ag")[3] + 4
    chars = max(8, int(tile_size * 1.6 / font.size))  # the characters a label of tile_size pixels holds

    def wrapped(text, width):
        return "\n".join(textwrap.wrap(str(text), width)[:4])

    columns = max(len(row) for row in tiles)
    left = tile_size if row_labels else 0
    top = line * max((wrapped(label, chars).count("\n") + 1 for label in column_labels), default=0) \
        if column_labels else 0
    under = line * max((len(caption.splitlines()) for row in captions or [] for caption in row), default=0)
    sheet = Image.new("RGB", (left + columns * tile_size, top + len(tiles) * (tile_size + under)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(column_labels or []):
        draw.multiline_text((left + c * tile_size + 4, 2), wrapped(label, chars), fill="black", font=font)
    for r, row in enumerate(tiles):
        y = top + r * (tile_size + under)
        if row_labels:
            draw.multiline_text((4, y + 4), wrapped(row_labels[r], chars), fill="black", font=font)
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((tile_size, tile_size)), (left + c * tile_size, y))
            if captions and captions[r][c]:
                draw.multiline_text((left + c * tile_size + 4, y + tile_size + 2), captions[r][c], fill="black",
                                    font=font)
    return sheet


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


OPTIONAL_COMPONENTS = {"safety_checker", "feature_extractor", "image_encoder"}  # loaded as None when absent


def check_pipeline_folder(path, index):
    """A local pipeline folder holds every component its model_index.json (`index`) names: refuse, in one line, a
    folder copied without one (the loader's own error would name a config key instead)."""
    if not os.path.isdir(path):
        return
    for name, value in index.items():
        if name not in OPTIONAL_COMPONENTS and not name.startswith("_") and isinstance(value, list) and \
                len(value) == 2 and value[1] and not os.path.isdir(os.path.join(path, name)):
            fail(f"{os.path.join(path, name)}/ is missing: model_index.json names a {value[1]} there; copy the whole "
                 "pipeline folder, or give its Hub id")


def refuse_repeated_rows(rows, metadata, columns=("file_name",)):
    """What two rows name alike (a file; with two columns, a pair of files) would count twice (scored twice, a group's
    reference twice, trained twice as strongly): refuse, in one line naming both rows."""
    first = {}
    for number, row in enumerate(rows, start=1):
        names = tuple(row.get(column) for column in columns) if isinstance(row, dict) else ()
        if names and all(isinstance(name, str) for name in names) and first.setdefault(names, number) != number:
            shown = names[0] if len(names) == 1 else names
            fail(f"{metadata}, rows {first[names]} and {number}: both name {shown!r}; remove the repeated row")


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
# Seeds, and what the stages' folders share


def sha256_of(obj):
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def derive(*parts):
    """A 31-bit seed from any tuple: the randomness of a sample or a step depends only on what it is."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def derive_seed(seed, group_id, variant_id, image_index):
    """An image's seed depends only on what the image is, never on batching or on the process that makes it."""
    return derive(seed, group_id, variant_id, image_index)


TORCH_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


def refuse_foreign_entries(folder, ours, flag):
    """`flag` (an overwrite) replaces only what the pack wrote: refuse, in one line, a folder that holds anything
    else. `ours(name)`: whether the pack wrote that entry; hidden entries are the pack's own bookkeeping."""
    foreign = sorted(name for name in os.listdir(folder) if not name.startswith(".") and not ours(name))
    if foreign:
        fail(f"{flag} replaces only what this pack wrote, and {folder} also holds {', '.join(foreign[:3])}"
             f"{' ...' if len(foreign) > 3 else ''}: move those away, or choose another --output_dir")
