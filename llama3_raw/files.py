"""The one way this project writes a file, and the one way it reads a JSON file.

Writes are atomic: the bytes go to a temporary file in the same folder, are flushed to disk, and the
file is renamed over its final name. A crash or a full disk half-way never leaves a half-written file
under that name: the old file (if any) is still there, whole, and the temporary file is removed.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is fsync'ed and renamed to `path`.

    For writers that want a file name (torch.save, savefig); `atomic_write` serves those that take a file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield temporary
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temporary binary file, then put it in place as `path` (see atomic_path)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        write(f)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a new temporary folder beside `path` to fill; on success it is renamed to `path` (which must
    not exist, or be an empty folder). On any failure the temporary folder and its files are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield temporary
        for file in temporary.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        temporary.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; a saved folder is like any other
        os.replace(temporary, path)  # replaces an empty folder of that name, as rename(2) allows
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    sync_folder(path.parent)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_new_folder(out_dir: Path, flag: str) -> None:
    """A folder about to be written must not hold anything yet: nothing already on disk is overwritten."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{flag} {out_dir} already exists and is not an empty folder; choose a new folder name.")


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


def read_text(path: str | Path, what: str = "", fix: str = "pass the path of a UTF-8 text file") -> str:
    """The UTF-8 text in `path`, or a UserError naming the file (and `what`, the flag that named it) and the fix."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
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
    name = f"{what} {path}" if what else str(path)
    try:
        value = json.loads(read_text(path, what, fix))
    except json.JSONDecodeError as err:
        raise UserError(f"{name} is not valid JSON ({err}); {fix}.") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise UserError(f"{name} does not hold a JSON {kind}; {fix}.")
    return value
