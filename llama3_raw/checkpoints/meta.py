"""Meta's own checkpoint file, consolidated.NN.pth: opened memory-mapped, restricted to plain tensors, checked.

`torch.load(..., mmap=True, weights_only=True)`: no pickled code can run, and the tensors are views of
the file's pages, so the weights live in memory once (as page cache) and a bf16 checkpoint computed in
bf16 is never copied. Every failure of a damaged or foreign file becomes one sentence (UserError).
"""

import ctypes
import mmap
import pickle
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import UserError, first_line
from ..params import ModelParams

READ_CHUNK_BYTES = 64 << 20
PROGRESS_MIN_BYTES = 256 << 20  # smaller files load too fast for a progress bar to mean anything
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number of pre-1.6 torch.save


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("consolidated.*.pth"))


def warm_page_cache(path: Path, show_progress: bool) -> None:
    """Read the file once, sequentially, so the memory-mapped tensors find its pages in the page cache.

    This is where the disk time goes, so this is where the progress bar is; the bytes read here land
    in the kernel's page cache, not in a second copy inside this process. A file whose pages are all there
    already (read by an earlier run) is not read again: that pass took 2.2 s of an 8B run's start for nothing.
    """
    size = path.stat().st_size
    if cached_fraction(path) >= 0.99:
        return
    buffer = bytearray(min(READ_CHUNK_BYTES, max(size, 1)))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"reading {path.name}",
        disable=not show_progress or size < PROGRESS_MIN_BYTES, leave=False,
    ) as bar:
        while n := f.readinto(view):
            bar.update(n)


def cached_fraction(path: Path) -> float:
    """The fraction of the file's pages in the page cache (mincore(2) over a mapping of it that reads nothing);
    0.0 where that cannot be told."""
    size = path.stat().st_size
    if size == 0:
        return 1.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
            anchor = ctypes.c_char.from_buffer(mapping)  # the mapping's address (released before it closes)
            pages = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
            failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), pages)
            del anchor
    except (OSError, ValueError, AttributeError):
        return 0.0
    if failed:
        return 0.0
    return (torch.frombuffer(pages, dtype=torch.uint8) & 1).sum().item() / len(pages)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load, memory-mapped and restricted to plain tensors, with every failure turned into one sentence."""
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive whose directory sits at the end
        with open(path, "rb") as f:
            legacy = f.read(len(LEGACY_TORCH_MAGIC)) == LEGACY_TORCH_MAGIC
        if legacy:
            raise UserError(f"{path} was saved in PyTorch's legacy (non-zip) format, which cannot be memory-mapped; "
                            f"re-save it with a current torch.save.")
        raise UserError(f"{path} is truncated or corrupt (not a complete PyTorch zip archive); download it again.")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower() or "unsupported global" in str(err).lower():
            raise UserError(
                f"{path} holds Python objects other than plain tensors, which are refused because loading them "
                f"could run code; re-save it as a dict of tensors (torch.save(model.state_dict(), ...))."
            ) from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first_line(err)}); download it again.") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is truncated or corrupt ({first_line(err)}); download it again.") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a dict of tensors; point --ckpt-dir at Meta's consolidated checkpoint.")
    not_tensors = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        raise UserError(
            f"{path} holds entries that are not tensors ({', '.join(map(repr, not_tensors[:3]))}); "
            f"re-save it as a plain dict of name -> tensor."
        )
    return state


def check_weights(state: dict[str, torch.Tensor], params: ModelParams, path: Path,
                  shapes: dict[str, tuple[int, ...]] | None = None) -> bool:
    """Every expected key with the shape params.json implies (or `shapes`: a rank's slices), nothing extra.
    Returns whether the output is tied to the embeddings."""
    expected = dict(shapes) if shapes is not None else params.weight_shapes()
    tied_output = "output.weight" not in state  # Llama 3.2 1B/3B share the embedding matrix with the output
    if tied_output:
        del expected["output.weight"]
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) such as {', '.join(missing[:3])}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s) such as {', '.join(extra[:3])}")
        raise UserError(
            f"{path} does not match its params.json ({'; '.join(parts)}); "
            f"make sure the weights and their params.json (or config.json) come from the same Llama 3 download."
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserError(
                f"{path}: {key} has shape {tuple(state[key].shape)} but params.json implies {shape}; "
                f"make sure the weights and their params.json (or config.json) come from the same Llama 3 download."
            )
        if not state[key].is_floating_point():
            raise UserError(f"{path}: {key} has dtype {state[key].dtype}, not a floating-point type; download the checkpoint again.")
    return tied_output
