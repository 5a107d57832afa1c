"""A GGUF file's header read into plain data: its metadata and where each tensor's bytes lie in the file.

GGUF (llama.cpp's format, github.com/ggml-org/ggml/blob/master/docs/gguf.md) is, little-endian:

    b"GGUF", version (u32, 2 or 3), tensor count (u64), metadata count (u64)
    metadata:     key (string), value type (u32), value        string = length (u64) + UTF-8 bytes
                                                                array  = element type (u32), count (u64), elements
    tensor infos: name (string), n_dims (u32), dims (u64 each, the fastest-moving first), type (u32), offset (u64)
    padding to `general.alignment` (default 32), then the tensors' data, each at its offset from there

The header is someone else's data: every count and length is checked against the bytes left in the file
before anything is allocated for it, so a file that claims a 2**60-entry array is one sentence, not an
out-of-memory kill. gguf-py's GGUFReader reads the same format, but builds a Python object per array
element (1.6 s for SmolLM2's 49,152-token vocabulary, about 13 s for Llama 3's 128,256 tokens and 280,147
merges) and does not bound counts by the file; this reader takes the type tables from the `gguf` package
and reads a 128K vocabulary in a fraction of a second. tests/test_gguf.py checks it against GGUFReader.
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import regular_file_size

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts and is long gone
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # arrays of arrays exist (rarely); deeper nesting is no model's metadata
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MIN_ITEM_BYTES = 8  # a string's length field; the smallest scalar is 1 byte, so arrays use their own size
FIX = "download it again, or pass another model"


def gguf_package():
    """The `gguf` package (llama.cpp's own Python library), or one sentence saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package, which is not installed; "
                        "pip install gguf") from None
    return gguf


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # as PyTorch orders it: the slowest-moving dimension first ((out, in) for a matrix)
    ggml_type: int
    start: int  # byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict  # key -> int | float | bool | str | list | numpy array (numeric arrays)
    tensors: dict[str, TensorInfo]
    size: int
    mapping: mmap.mmap  # the whole file, copy-on-write: tensors are views of its pages (torch.frombuffer)


def is_gguf_file(path: Path) -> bool:
    """Named .gguf, or starting with GGUF's magic (a file renamed by a download tool)."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class HeaderReader:
    """Reads the header front to back, refusing any length the bytes left cannot hold."""

    def __init__(self, data, size: int, path: Path):
        self.data, self.size, self.path, self.pos = data, size, path, 0

    def fail(self, why: str) -> UserError:
        return UserError(f"{self.path} is not a readable GGUF file ({why}); {FIX}.")

    def take(self, n: int, what: str) -> int:
        """Claim `n` bytes for `what`; returns where they start."""
        if n > self.size - self.pos:
            raise self.fail(f"{what} runs past the end of the file at byte {self.size}: truncated")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, item_bytes: int) -> int:
        """A u64 count of items of at least `item_bytes` each, checked against the bytes left."""
        n = self.scalar("<Q", what)
        if n * item_bytes > self.size - self.pos:
            raise self.fail(f"{what} is {n:,}, more than the {self.size - self.pos:,} bytes left can hold")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"the length of {what}", 1)
        start = self.take(n, what)
        try:
            return bytes(self.data[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in SCALARS:
            return self.scalar(SCALARS[kind], what)
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY and depth < MAX_ARRAY_DEPTH:
            return self.array(what, depth + 1)
        raise self.fail(f"{what} has value type {kind}, which GGUF does not define" if kind != ARRAY
                        else f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")

    def array(self, what: str, depth: int):
        kind = self.scalar("<I", f"the element type of {what}")
        if kind in SCALARS:  # numbers: one read, no Python object per element
            fmt = SCALARS[kind]
            n = self.count(f"the length of {what}", struct.calcsize(fmt))
            start = self.take(n * struct.calcsize(fmt), what)
            return np.frombuffer(self.data, dtype=np.dtype(fmt), count=n, offset=start).copy()
        n = self.count(f"the length of {what}", MIN_ITEM_BYTES if kind in (STRING, ARRAY) else 1)
        if kind == STRING:
            return self.strings(n, what)
        return [self.value(kind, f"item {i} of {what}", depth) for i in range(n)]

    def strings(self, n: int, what: str) -> list[str]:
        """`n` strings, as `string` reads each, in one tight loop: a Llama 3 vocabulary's 128,256 tokens and
        280,147 merges are 400k of them, read three times when a run opens a GGUF (params, tokenizer, weights)."""
        data, size, pos, out = self.data, self.size, self.pos, []
        length_at = struct.Struct("<Q").unpack_from
        for i in range(n):
            if size - pos < 8:
                self.pos = pos
                raise self.fail(f"the length of item {i} of {what} runs past the end of the file at byte {size}: truncated")
            (length,) = length_at(data, pos)
            if length > size - pos - 8:
                self.pos = pos
                raise self.fail(f"the length of item {i} of {what} is {length:,}, more than the "
                                f"{size - pos - 8:,} bytes left can hold")
            out.append(data[pos + 8:pos + 8 + length])
            pos += 8 + length
        self.pos = pos
        try:
            return [item.decode("utf-8") for item in out]
        except UnicodeDecodeError:
            bad = next(i for i, item in enumerate(out) if not is_utf8(item))
            raise self.fail(f"item {bad} of {what} is not UTF-8 text") from None


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_gguf(path: Path) -> GGUFFile:
    """The header of the GGUF file `path`, every count, offset and size checked against the file."""
    path = Path(path)
    size = regular_file_size(path, "GGUF file", "pass a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise UserError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); {FIX}.")
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # size >= 4: mapping a file of 0 bytes fails
    reader = HeaderReader(mapping, size, path)
    reader.take(4, "the magic")
    version = reader.scalar("<I", "the version")
    if version not in VERSIONS:
        raise reader.fail(f"version {version}; this reader knows GGUF versions {' and '.join(map(str, VERSIONS))}")
    n_tensors = reader.count("the tensor count", 8 + 4 + 8 + 4 + 8)  # the smallest tensor info: 32 bytes
    n_keys = reader.count("the metadata count", 8 + 4 + 1)
    metadata = {}
    for i in range(n_keys):
        key = reader.string(f"metadata key {i}")
        if key in metadata:
            raise reader.fail(f"metadata key {key!r} appears twice")
        metadata[key] = reader.value(reader.scalar("<I", f"the type of {key}"), key)
    infos = [tensor_info(reader, i) for i in range(n_tensors)]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise reader.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-reader.pos // alignment) * alignment
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        if name in tensors:
            raise reader.fail(f"tensor {name} appears twice")
        tensors[name] = place_tensor(reader, name, shape, ggml_type, offset, data_start, alignment)
    return GGUFFile(path, version, metadata, tensors, size, mapping)


def tensor_info(reader: HeaderReader, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name = reader.string(f"the name of tensor {index}")
    n_dims = reader.scalar("<I", f"the dimension count of {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise reader.fail(f"tensor {name} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
    dims = [reader.scalar("<Q", f"a dimension of {name}") for _ in range(n_dims)]
    ggml_type = reader.scalar("<I", f"the type of {name}")
    offset = reader.scalar("<Q", f"the offset of {name}")
    return name, tuple(reversed(dims)), ggml_type, offset


def place_tensor(reader: HeaderReader, name: str, shape: tuple[int, ...], ggml_type: int, offset: int,
                 data_start: int, alignment: int) -> TensorInfo:
    """Where tensor `name` lies, once its type, size and offset are known to fit the file."""
    gguf = gguf_package()
    sizes = gguf.GGML_QUANT_SIZES
    try:
        kind = gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        kind = None
    if kind is None or ggml_type not in sizes:
        raise reader.fail(f"tensor {name} has type {ggml_type}, which the gguf package does not know")
    block, block_bytes = sizes[ggml_type]
    if any(d <= 0 for d in shape) or shape[-1] % block:
        raise reader.fail(f"tensor {name} has shape {shape}, which {kind}'s blocks of {block} cannot hold")
    n = 1
    for d in shape:
        n *= d
    nbytes = n // block * block_bytes
    start = data_start + offset
    if offset % alignment or start + nbytes > reader.size:
        raise reader.fail(f"tensor {name} ({nbytes:,} bytes at offset {offset:,}) lies past the end of the file "
                          f"or off its {alignment}-byte alignment: truncated or corrupt")
    return TensorInfo(name, shape, ggml_type, start, nbytes)


def type_name(ggml_type: int) -> str:
    return gguf_package().GGMLQuantizationType(ggml_type).name
