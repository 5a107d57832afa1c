"""One writer per output: a command that writes into an output (train's --out, inspect's --out, train_tokenizer's
--output) holds it for itself while it runs (`writing_alone`), so a second command given the same output is
refused at once, in one sentence that names the process holding it.

The hold is an OS lock (flock(2)), which the kernel drops when its process ends, however it ends: a `kill -9`
leaves nothing behind that blocks the next run (or its --resume). A folder is locked through its own
descriptor, so nothing is added to it; a single file through a hidden `.NAME.lock` beside it, removed at the end.
"""

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError
from .files import check_writable_folder, in_flight, make_folder, missing_parents


@contextlib.contextmanager
def writing_alone(path: str | Path, flag: str, folder: bool = True) -> Iterator[None]:
    """Inside, this process alone writes `path`: a folder (made if missing; locked through its own descriptor,
    nothing is added to it) or, with folder=False, a file (locked through a hidden `.NAME.lock` beside it, removed
    again at the end). Another process holding it already: a UserError naming `flag`, `path` and that process.
    Folders made here and still empty at the end (the command failed before it wrote) are removed again, by the
    process that held them only: a refused one leaves them to the holder. Two commands started at the same
    moment: one holds the output, the other is refused. On a file system without locks (some network ones) the
    command runs unlocked, as before."""
    path = Path(path)
    target = path if folder else path.parent
    created = missing_parents(target) + ([] if os.path.exists(target) else [target])
    make_output_folder(target, flag if folder else f"{flag} {path}: its folder")
    try:  # the folder is only checked once held: the check's own test file must not race another command's
        fd = lock_folder(target) if folder else lock_beside(lock_file_for(path))
    except HeldElsewhere as held:
        by = f"another process ({held.holder})" if held.holder else "another process"
        raise UserError(f"{flag} {path} is being written by {by}; wait until it ends (or stop it), or choose "
                        f"another {flag}.") from None
    try:
        with contextlib.ExitStack() as known:
            for made in created:  # a signal that ends the process at once removes them too, if still empty
                known.enter_context(in_flight(made, "empty"))
            if not folder:
                known.enter_context(in_flight(lock_file_for(path), "file"))
            check_writable_folder(target, flag if folder else f"{flag} {path}: its folder")
            yield
    finally:
        if fd is not None and not folder:
            with contextlib.suppress(OSError):
                os.unlink(lock_file_for(path))  # while still held: see lock_beside
        for made in sorted(created, key=lambda p: len(p.parts), reverse=True):  # deepest first, only if still empty
            with contextlib.suppress(OSError):
                made.rmdir()
        if fd is not None:
            os.close(fd)


def make_output_folder(folder: Path, flag: str) -> None:
    """mkdir -p `folder`; where that fails, check_writable_folder's sentence says why (make_folder's if it has none)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        check_writable_folder(folder, flag)
        make_folder(folder)


class HeldElsewhere(Exception):
    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def lock_file_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def lock_folder(folder: Path) -> int | None:
    """A descriptor of `folder` that holds its exclusive lock (None where this file system takes no locks);
    HeldElsewhere when another process holds it. A folder removed and made again in between (by a command that
    started with this one and ended): its new one."""
    while True:
        fd = take_lock(opened(folder, os.O_RDONLY | os.O_DIRECTORY))
        if fd is None or same_file(folder, fd):
            return fd
        os.close(fd)
        folder.mkdir(parents=True, exist_ok=True)


def same_file(path: Path, fd: int) -> bool:
    try:
        info, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (info.st_dev, info.st_ino) == (held.st_dev, held.st_ino)


def lock_beside(lock_path: Path) -> int | None:
    """As lock_folder, on the file `lock_path` (made if missing). Its holder removes it before letting go, so a
    process that opened the old file and got its lock after that tries again on the new one."""
    while True:
        fd = take_lock(opened(lock_path, os.O_RDWR | os.O_CREAT))
        if fd is None or same_file(lock_path, fd):
            return fd
        os.close(fd)  # the file this lock is on was removed by the holder that just let go: lock the new one


def opened(path: Path, flags: int) -> int | None:
    """A descriptor to lock, or None where it cannot be opened (a folder that may be written but not read): then
    the command runs unlocked, and its writes say what is wrong with the folder, if anything."""
    try:
        return os.open(path, flags, 0o644)
    except OSError:
        return None


def take_lock(fd: int | None) -> int | None:
    """`fd`, now holding its file's exclusive flock; None (fd closed) where the file system takes no locks."""
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        raise HeldElsewhere(holder) from None
    except OSError:  # ENOLCK, EOPNOTSUPP...: no locks on this file system
        os.close(fd)
        return None
    return fd


def lock_holder(fd: int) -> str:
    """"pid N: its command line" of the process holding the flock on `fd`'s file, from /proc/locks (Linux);
    "" where that cannot be told."""
    info = os.fstat(fd)
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "->" lines are processes waiting, not holding
            continue
        try:
            major, minor, inode = fields[5].split(":")
            same = (int(major, 16), int(minor, 16), int(inode)) == (os.major(info.st_dev), os.minor(info.st_dev),
                                                                    info.st_ino)
            pid = int(fields[4])
        except ValueError:
            continue
        if same:
            return f"pid {pid}: {command_line(pid)}" if command_line(pid) else f"pid {pid}"
    return ""


def command_line(pid: int, limit: int = 120) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return ""
    text = " ".join(w.decode("utf-8", "replace") for w in words)
    return text if len(text) <= limit else text[:limit - 3] + "..."
