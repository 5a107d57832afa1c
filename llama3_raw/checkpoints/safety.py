"""What a checkpoint folder may make the loader do: read only regular files inside the folder, and allocate
only what the files on disk can hold.

A folder is data someone else wrote. Its index may name `../elsewhere/x.safetensors` or `/etc/passwd`, its
files may be symlinks out of it, FIFOs (an open that never returns), /dev/zero (a read that never ends) or
folders; its params.json may say n_layers 1e9 (a shape table of 9e9 entries). All of that is refused here,
by file metadata alone, before anything is opened or allocated.
"""

from pathlib import Path

from ..errors import UserError
from ..files import megabytes, named, regular_file_size
from ..params import ModelParams

MIN_BYTES_PER_PARAMETER = 0.5  # int4 matrices; every other format stores more per parameter


def allowed_roots(ckpt_dir: Path) -> tuple[Path, ...]:
    """Where the folder's files may resolve to: the folder itself, and for a Hugging Face hub cache snapshot
    (snapshots/<revision>/NAME -> ../../blobs/<hash>) that repository's blobs folder."""
    root = ckpt_dir.resolve()
    if root.parent.name == "snapshots":
        return root, root.parent.parent / "blobs"
    return (root,)


def folder_file_size(ckpt_dir: Path, path: Path, what: str = "") -> int:
    """The size of `path`, a file of the checkpoint folder `ckpt_dir`, once it is known to resolve (symlinks
    followed) to a regular file inside the folder. `what` says what named it (e.g. an index's entry)."""
    name = named(path, what)
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in allowed_roots(ckpt_dir)):
        raise UserError(f"{name} resolves to {resolved}, outside the checkpoint folder {ckpt_dir}; a checkpoint's "
                        f"files must lie inside its folder, so copy the file in (or fix the entry).")
    return regular_file_size(path, what, "put the checkpoint's own file there")


def check_params_fit_files(params: ModelParams, file_bytes: int, where: Path) -> None:
    """params.json (or config.json) must describe a model the weight files can hold, checked by arithmetic
    before any shape table is built or any tensor allocated."""
    tied_output = params.vocab_size * params.dim  # a tied checkpoint does not store the output matrix
    needed = int((params.parameter_count() - tied_output) * MIN_BYTES_PER_PARAMETER)
    if needed > file_bytes:
        raise UserError(f"{where} describes a model of {params.parameter_count():,} parameters (at least "
                        f"{megabytes(needed)}) but the weight files hold {megabytes(file_bytes)}; the settings "
                        f"belong to another model, restore the ones that came with these weights.")


def missing_folder(ckpt_dir: Path) -> UserError:
    """Said alike to a Python caller (load_checkpoint, open_folder) and on the command line (--ckpt-dir)."""
    return UserError(f"checkpoint folder {ckpt_dir} does not exist; name a folder that holds params.json and "
                     f"consolidated.00.pth (on the command line: --ckpt-dir DIR; with no folder named, the default).")
