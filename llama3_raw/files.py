"""The one way this project writes a file, and the one way it reads a JSON file.

Writes are atomic: the bytes go to a temporary file in the same folder, are flushed to disk, and the
file is renamed over its final name. A crash or a full disk half-way never leaves a half-written file
under that name: the old file (if any) is still there, whole, and the temporary file is removed.

The temporary files and folders being written are known (IN_FLIGHT), so that a signal that ends the process
at once (events.py: SIGTERM, SIGHUP) removes them first. A second writer of one output: locks.py.
"""

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import UserError

MAX_JSON_BYTES = 64 << 20  # every JSON file read here is settings or a conversation; a bigger one is a mistake
# What this process is writing now, to remove if a signal ends it at once (remove_in_flight): path -> "file"
# (a temporary file), "tree" (a temporary folder and its files) or "empty" (a folder made for an output, if still empty).
# Process state, like the open files themselves; the model math has none.
IN_FLIGHT: dict[Path, str] = {}


@contextlib.contextmanager
def in_flight(path: Path, kind: str) -> Iterator[None]:
    IN_FLIGHT[path] = kind
    try:
        yield
    finally:
        IN_FLIGHT.pop(path, None)


def remove_in_flight() -> None:
    """Remove every temporary file and folder being written (files before folders, deepest folders first)."""
    order = {"file": 0, "tree": 1, "empty": 2}
    for path, kind in sorted(IN_FLIGHT.items(), key=lambda item: (order[item[1]], -len(item[0].parts))):
        with contextlib.suppress(OSError):
            if kind == "file":
                os.unlink(path)
            elif kind == "tree":
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rmdir(path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is fsync'ed and renamed to `path`.

    For writers that want a file name (torch.save, savefig); `atomic_write` serves those that take a file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with in_flight(temporary, "file"):
            yield temporary
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(temporary, path)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_failure(path, err) from None
        raise
    sync_folder(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temporary binary file, then put it in place as `path` (see atomic_path)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        write(f)


@contextlib.contextmanager
def atomic_folder(path: str | Path, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield a new temporary folder beside `path` to fill; on success it is renamed to `path` (which must
    not exist, or be an empty folder). On any failure the temporary folder and its files are removed, and
    an OSError (a full disk...) becomes one sentence, saying `needed_bytes` if the disk was full.

    The parents the folder needs are created too; those that were created for a save that failed are removed."""
    path = Path(path)
    created = missing_parents(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        with in_flight(temporary, "tree"):
            yield temporary
            for file in temporary.iterdir():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            temporary.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; a saved folder is like any other
            os.replace(temporary, path)  # replaces an empty folder of that name, as rename(2) allows
    except BaseException as err:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        for parent in created:  # deepest first; only the folders this save made, and only if still empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        if isinstance(err, OSError):
            raise write_failure(path, err, needed_bytes) from None
        raise
    sync_folder(path.parent)


def missing_parents(path: Path) -> list[Path]:
    """The parents of `path` that do not exist yet, deepest first."""
    return [parent for parent in path.parents if not os.path.exists(parent)]  # os.path's: no raise on a name too long


def write_failure(path: Path, err: OSError, needed_bytes: int = 0) -> UserError:
    """A write that failed half-way, as one sentence; the caller has removed what it wrote."""
    if err.errno == errno.ENOSPC:
        need = f" (it needs about {megabytes(needed_bytes)})" if needed_bytes else ""
        return UserError(f"writing {path} failed: no space left on the disk{need}; nothing was left behind, "
                         f"free some space or write elsewhere.")
    if err.errno == errno.EISDIR:
        return UserError(f"writing {path} failed: it is a folder; nothing was left behind, name a file to write instead.")
    return UserError(f"writing {path} failed ({err.strerror or err}); nothing was left behind, fix that or write elsewhere.")


def megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.0f} MB" if n_bytes >= 1e6 else f"{n_bytes:,} bytes"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_new_folder(out_dir: Path, flag: str, needed_bytes: int = 0) -> None:
    """A folder about to be written must not hold anything yet: nothing already on disk is overwritten.
    It must also be creatable, with room for `needed_bytes`: checked before the work, not found out after."""
    # os.path's exists, not Path's: False for a name too long, where Path.exists raises
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or any(Path(out_dir).iterdir())):
        raise UserError(f"{flag} {out_dir} already exists and is not an empty folder; choose a new folder name.")
    check_writable_folder(out_dir, flag, needed_bytes)


def check_writable_folder(folder: Path, flag: str, needed_bytes: int = 0) -> None:
    """`folder` is a folder, or can be made one, files can really be created in it, and the disk it is on has
    `needed_bytes` free. Tried, not guessed from permission bits: root passes every os.access check, yet
    cannot create /proc/x; the folders and the file the try makes are removed again."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))  # os.path's: False, not raise, on EACCES
    if not existing.is_dir():
        raise UserError(f"{flag} {folder} cannot be created: {existing} is a file, not a folder; choose another path.")
    try:
        try_writing_in(folder)
    except OSError as err:
        raise UserError(f"{flag} {folder} cannot be written ({refusal(err)}); choose a folder you can write to.") from None
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise UserError(f"{flag} {folder} needs about {megabytes(needed_bytes)} but its disk has {megabytes(free)} "
                        f"free; free some space or choose a folder on another disk.")


def check_output_file(path: Path, flag: str) -> None:
    """A file about to be written (replaced whole, atomically, if it exists): not a folder, and its folder writable."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; name the file to write (a new name, or one inside that folder).")
    check_writable_folder(Path(path).parent, f"{flag} {path}: its folder")


def try_writing_in(folder: Path) -> None:
    """Make `folder` (and its missing parents) and an empty file in it, then remove all of that again."""
    created = missing_parents(folder) + ([] if os.path.exists(folder) else [folder])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-check.", suffix=".partial", dir=folder)
        os.close(fd)
        os.unlink(name)
    finally:
        for made in sorted(created, key=lambda p: len(p.parts), reverse=True):  # deepest first, only if still empty
            with contextlib.suppress(OSError):
                made.rmdir()


def refusal(err: OSError) -> str:
    """Why the system refused a write, in words that fit an output path (ENOENT under /proc is not "missing")."""
    words = {errno.EACCES: "permission denied", errno.EPERM: "not permitted there", errno.EROFS: "read-only file system",
             errno.ENOENT: "this file system does not take new files", errno.ENOTDIR: "a part of it is not a folder",
             errno.EEXIST: "something that is not a folder is in the way"}
    return words.get(err.errno, err.strerror or str(err))


def make_folder(path: Path) -> None:
    """mkdir -p, with a failure said as one sentence (what atomic_path says of a file it cannot write)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failure(Path(path), err) from None


def write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_png(path: str | Path, figure, dpi: float | None = None) -> None:
    """A matplotlib figure as a PNG file."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)


def sync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (where the file system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def named(path: str | Path, what: str) -> str:
    """How an error names a file: with `what`, the flag that gave it, in front ("--chat-file chat.json")."""
    return f"{what} {path}" if what else str(path)


def regular_file_size(path: str | Path, what: str = "", fix: str = "pass the path of a file") -> int:
    """The size of `path` after checking, before anything opens it, that it is a regular file (a symlink is
    followed): a FIFO would hang the open, /dev/zero a read, and a folder would raise IsADirectoryError."""
    name = named(path, what)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{name} does not exist; {fix}.") from None
    except OSError as err:
        raise UserError(f"{name} cannot be read ({err.strerror or err}); {fix}.") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a pipe" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise UserError(f"{name} is {kind}, not a regular file; {fix}.")
    return info.st_size


def read_text(path: str | Path, what: str = "", fix: str = "pass the path of a UTF-8 text file",
              max_bytes: int | None = None) -> str:
    """The UTF-8 text in `path`, or a UserError naming the file (and `what`, the flag that named it) and the fix.
    With `max_bytes`, a bigger file is refused before it is read."""
    path = Path(path)
    name = named(path, what)
    size = regular_file_size(path, what, fix)
    if max_bytes is not None and size > max_bytes:
        raise UserError(f"{name} is {megabytes(size)}, more than the {megabytes(max_bytes)} such a file can be; {fix}.")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{name} does not exist; {fix}.") from None
    except UnicodeDecodeError:
        raise UserError(f"{name} is not UTF-8 text; convert it to UTF-8, or {fix}.") from None
    except OSError as err:
        raise UserError(f"{name} cannot be read ({err.strerror or err}); {fix}.") from None


def read_json(path: str | Path, fix: str, what: str = "", expect: type | None = None):
    """The parsed JSON in `path`, or a UserError naming the file and the fix:
    "[{what} ]{path} is not valid JSON (...); {fix}." -- `what` is the flag that named the file, if any.
    With `expect` (dict or list), a file holding another kind of JSON value is refused the same way."""
    name = named(path, what)
    try:
        value = json.loads(read_text(path, what, fix, MAX_JSON_BYTES), parse_constant=refuse_constant)
    except json.JSONDecodeError as err:
        raise UserError(f"{name} is not valid JSON ({err}); {fix}.") from None
    except ValueError as err:  # NaN or Infinity: Python's json accepts them, JSON does not
        raise UserError(f"{name} holds {err}, which is not a JSON number; {fix}.") from None
    except RecursionError:
        raise UserError(f"{name} is nested too deeply to be a settings file; {fix}.") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise UserError(f"{name} does not hold a JSON {kind}; {fix}.")
    return value


def refuse_constant(name: str):
    raise ValueError(name)
