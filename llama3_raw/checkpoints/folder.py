"""A checkpoint folder opened for use, in two steps, so that everything cheap is checked before the weights are read:

1. `open_folder`: the folder (given, or the default one), params, tokenizer (checked against the vocabulary)
   and the folder's generation defaults -- a bad prompt or tokenizer should not cost a 16 GB load;
2. `load_model`: the weights in the compute dtype on the compute device, int8 or int4 if asked (and saved if asked).

Every command-line tool (run, chat, inspect, compare, score) opens checkpoints through these two.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import UserError, notice
from ..files import check_new_folder
from ..parallel import SINGLE_PROCESS, Ranks
from ..params import ModelParams
from ..quantize import INT4_GROUP_SIZE, INT4_GROUP_SIZES, check_int4_shape, is_quantized_key
from ..tokenizer import Tokenizer, load_tokenizer
from ..threads import use_threads
from .defaults import (GENERATION_DEFAULTS_FILE, choose_dtype, generation_defaults, generation_file_settings,
                       refuse_float32_with_quantized)
from .loading import (cast_weights, check_folder_files, checkpoint_params, conversion_note, count_parameters,
                      default_tokenizer_path, is_hf_format, load_checkpoint, quantization)
from .gguf_checkpoint import gguf_path
from .gguf_file import read_gguf
from .gguf_quants import GROUP as GGUF_INT4_GROUP, kept_int4
from ..gguf_vocab import gguf_tokenizer
from .quantized import quantized_checkpoint_bytes, quantized_file, save_quantized_checkpoint
from .meta import checkpoint_files
from .places import find_default_checkpoint
from .safety import missing_folder
from .heap import return_freed_heap
from .placement import copy_pays_back, in_huge_pages
from .slicing import rank_shapes


@dataclass(frozen=True)
class CheckpointFolder:
    """A checkpoint folder whose cheap parts are read and checked; the weights are not read yet."""

    directory: Path
    params: ModelParams  # as the folder's params.json (or config.json) says
    tokenizer: Tokenizer
    defaults: dict  # generation settings: built-in, overridden by the folder's generation.json

    @property
    def is_base_model(self) -> bool:
        """The folder's generation.json says `"instruct": false`: a base model, which continues text but does
        not answer in Meta's chat format. Without that key nothing is known (official folders do not say)."""
        return self.defaults.get("instruct") is False

    def params_for_generation(self, context_len: int | None) -> ModelParams:
        """The params a generation run uses: its context is `context_len` (--context-len) if given, else the
        context the model was trained for (generation.json), else the model family's own."""
        if context_len is None:
            trained = self.defaults.get("context_len")
            return self.params if trained is None else replace(self.params, max_seq_len=min(trained, self.params.context_len))
        if context_len > self.params.context_len:
            raise UserError(f"--context-len {context_len} exceeds this model's maximum of {self.params.context_len} "
                            f"tokens; pass at most {self.params.context_len}.")
        return replace(self.params, max_seq_len=context_len)


@dataclass(frozen=True)
class Model:
    """An opened checkpoint, ready to run: the folder's parts and its weights in `dtype` on `device`."""

    directory: Path
    params: ModelParams
    tokenizer: Tokenizer
    defaults: dict
    weights: dict  # Meta's key names -> tensors in `dtype` on `device` (or int8 / int4 matrices, see quantize.py)
    dtype: torch.dtype
    device: str
    n_parameters: int  # this process's (under tensor parallelism, the rank's slice)
    ranks: Ranks = SINGLE_PROCESS
    dtype_reason: str = ""  # why `dtype`, in words (checkpoints.defaults.choose_dtype); run and chat print it
    source_format: str = "meta"  # the file it came from: "meta", "huggingface", "int8", "int4" (saved) or "gguf"

    @property
    def quantization(self) -> str | None:
        """"int8" or "int4" when the weight matrices are quantized (quantize.py), else None."""
        return quantization(self.weights)


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU here; use --device cpu.")


def open_tokenizer(ckpt_dir: Path, params: ModelParams, tokenizer_path: str | None) -> Tokenizer:
    """The tokenizer beside the checkpoint, inside a GGUF file, or the given one, checked against the weights'
    vocabulary."""
    source = gguf_path(ckpt_dir) if tokenizer_path is None else None
    path = str(source) if source is not None else tokenizer_path or str(default_tokenizer_path(ckpt_dir))
    if source is not None:
        file = read_gguf(source)
        tokenizer = gguf_tokenizer(file.metadata, source)
    else:
        tokenizer = load_tokenizer(path, "--tokenizer" if tokenizer_path is not None else "tokenizer file")
    if tokenizer.n_words != params.vocab_size:
        raise UserError(
            f"tokenizer {path} has {tokenizer.n_words} tokens but the checkpoint in {ckpt_dir} says vocab_size "
            f"{params.vocab_size}; use the tokenizer.model that came with these weights."
        )
    return tokenizer


def check_folder_complete(ckpt_dir: Path, tokenizer_path: str | None) -> None:
    """Refuse a --ckpt-dir that is a file (but a GGUF), or a folder in Meta's layout that lacks files (all named
    at once)."""
    if gguf_path(ckpt_dir) is not None:
        return  # one file holds it all: gguf_checkpoint.py names what is wrong with it
    if ckpt_dir.is_file():
        raise UserError(f"--ckpt-dir {ckpt_dir} is a file, not a folder; pass the folder that holds it "
                        f"({ckpt_dir.parent}) or another checkpoint folder.")
    if not ckpt_dir.is_dir():
        raise missing_folder(ckpt_dir)
    check_folder_files(ckpt_dir)  # what is there is a regular file inside the folder (safety.py)
    if is_hf_format(ckpt_dir):
        return  # config.json + safetensors: huggingface.py names what is missing
    present = {"params.json": (ckpt_dir / "params.json").is_file(),
               "consolidated.00.pth": bool(checkpoint_files(ckpt_dir)) or quantized_file(ckpt_dir) is not None,
               "tokenizer.model": tokenizer_path is not None or default_tokenizer_path(ckpt_dir).is_file()}
    missing = [name for name, found in present.items() if not found]
    if missing:
        raise UserError(f"checkpoint directory {ckpt_dir} lacks {' and '.join(missing)}; put Meta's params.json, "
                        f"consolidated.00.pth and tokenizer.model there, or pass another --ckpt-dir.")


def open_folder(ckpt_dir: Path | None, tokenizer_path: str | None = None, device: str = "cpu") -> CheckpointFolder:
    """Step 1: the folder (None: the default checkpoint), its params, tokenizer and generation defaults."""
    check_device(device)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else find_default_checkpoint()
    check_folder_complete(ckpt_dir, tokenizer_path)
    params = checkpoint_params(ckpt_dir)
    defaults = generation_defaults(ckpt_dir)
    return CheckpointFolder(ckpt_dir, params, open_tokenizer(ckpt_dir, params, tokenizer_path), defaults)


def load_model(folder: CheckpointFolder, params: ModelParams | None = None, dtype: str = "auto", device: str = "cpu",
               quantize: str = "none", save_quantized: Path | None = None, show_progress: bool = True,
               ranks: Ranks = SINGLE_PROCESS, group_size: int | None = None, new_tokens: int | None = None,
               keep_gguf_int4: bool = True) -> Model:
    """Step 2: the weights, verified, in the compute dtype (`dtype`: "auto", "float32" or "bfloat16") on `device`.

    `quantize="int8"` makes every weight matrix int8, "int4" int4 in groups of `group_size` inputs
    (None: quantize.INT4_GROUP_SIZE); `save_quantized` then also writes those weights as a new checkpoint folder. `params`
    defaults to the folder's (see params_for_generation). Under tensor parallelism (`ranks`) the weights
    are this rank's slice, and quantizing quantizes the slice: the column-split wo and w2 get their scales
    from the rank's part of each row. `new_tokens`: how many tokens the run will generate at most (None: a
    session of unknown length); on the CPU the weights go into 2 MiB pages only where that pays back
    (placement.copy_pays_back). `keep_gguf_int4`: with int4 in groups of 32, a GGUF's Q4_0 / Q4_1 matrices
    become int4 as the file has them (gguf_quants.as_int4), not dequantized and quantized again.
    """
    check_quantize_request(quantize, dtype, save_quantized, group_size)
    group_size = INT4_GROUP_SIZE if group_size is None else group_size
    if quantize == "int4":
        check_int4_shapes(folder, group_size, ranks)
    if save_quantized is not None and ranks.world_size > 1:
        raise UserError("--save-quantized writes the whole model from one process; run it without torchrun.")
    if save_quantized is not None:  # room for the quantized copy, before the work of loading and quantizing
        check_new_folder(save_quantized, "--save-quantized", quantized_checkpoint_bytes(folder.params, quantize))
    checkpoint = load_checkpoint(folder.directory, show_progress=show_progress, ranks=ranks)
    if quantize == "int4" and group_size == GGUF_INT4_GROUP and keep_gguf_int4 and checkpoint.source_format == "gguf":
        checkpoint = replace(checkpoint, weights=kept_int4(checkpoint.weights))
        return_freed_heap()  # the unpacking's temporaries
    saved_as = quantization(checkpoint.weights) if checkpoint.source_format != "gguf" else None
    if saved_as:  # saved by --save-quantized
        refuse_float32_with_quantized(dtype, f"{folder.directory} holds {saved_as} weights, which compute in bfloat16")
        if quantize not in ("none", saved_as):
            raise UserError(f"{folder.directory} holds {saved_as} weights already; drop --quantize {quantize}, or "
                            f"quantize the checkpoint they were made from.")
    compute, reason = choose_dtype(dtype, device, checkpoint.weights, quantize)
    note = conversion_note(checkpoint.weights, compute, folder.directory)
    if note:
        notice(note)
    n_parameters = count_parameters(checkpoint.weights)
    # Matrices in int8 or int4 + their scales (quantized one by one as they are cast), activations in bf16.
    scheme = quantize if quantize != "none" and not saved_as else "none"
    weights = cast_weights(checkpoint.weights, compute, device, show_progress, scheme, group_size)
    source_format = checkpoint.source_format
    file_params = checkpoint.params  # the folder's, but with kv heads counted once (shards.keep_kv_heads_once)
    del checkpoint  # when the dtype changed, this lets the memory-mapped file go
    if save_quantized is not None:
        save_quantized_checkpoint(weights, folder.params, quantize, default_tokenizer_path(folder.directory),
                                  save_quantized, extra_files=(folder.directory / GENERATION_DEFAULTS_FILE,))
    if device == "cpu" and copy_pays_back(new_tokens):  # a long run: decode steps read fewer page tables
        weights = in_huge_pages(weights, show_progress=show_progress)
    return_freed_heap()  # what converting the weights freed
    if device == "cuda":
        torch.cuda.synchronize()
    context = (params or folder.params).max_seq_len
    return Model(folder.directory, replace(file_params, max_seq_len=context),
                 folder.tokenizer, folder.defaults, weights, compute, device, n_parameters, ranks, reason, source_format)


def check_quantize_request(quantize: str, dtype: str, save_quantized: Path | None, group_size: int | None = None) -> None:
    """Refuse a quantization request that cannot work before anything is read."""
    if quantize != "none":
        refuse_float32_with_quantized(dtype, f"--quantize {quantize} computes in bfloat16 ({quantize} weights, bf16 "
                                             f"activations)")
    if group_size is not None and quantize != "int4":
        raise UserError("--group-size only applies to int4 weights; add --quantize int4 (or drop --group-size).")
    if group_size is not None and group_size not in INT4_GROUP_SIZES:
        raise UserError(f"--group-size {group_size} is none of {', '.join(map(str, INT4_GROUP_SIZES))}; pick one of those.")
    if save_quantized is not None:
        if quantize == "none":
            raise UserError("--save-quantized writes quantized weights; add --quantize int8 or --quantize int4.")
        check_new_folder(save_quantized, "--save-quantized")


def check_int4_shapes(folder: CheckpointFolder, group_size: int, ranks: Ranks) -> None:
    """Every matrix (a rank's part of it under tensor parallelism) must suit PyTorch's int4 kernels."""
    for key, shape in rank_shapes(folder.params, ranks).items():
        problem = check_int4_shape(shape, group_size) if is_quantized_key(key) else None
        if problem:
            working = [g for g in INT4_GROUP_SIZES if not check_int4_shape(shape, g)]
            fix = f"pass --group-size {working[-1]}" if working else "use --quantize int8"
            part = key if ranks.world_size == 1 else f"each of {ranks.world_size} ranks' part of {key}"
            fewer = "" if working or ranks.world_size == 1 else " or fewer ranks"
            raise UserError(f"--quantize int4 cannot take {part} of {folder.directory}: {problem}; {fix}{fewer}.")


def open_model(ckpt_dir: Path | None, tokenizer_path: str | None = None, dtype: str = "auto", device: str = "cpu",
               show_progress: bool = True, threads: int | None = None) -> Model:
    """Both steps at once, for tools that check nothing in between (inspect, score); `threads` as
    threads.use_threads chooses for this model's size when None."""
    folder = open_folder(ckpt_dir, tokenizer_path, device)
    use_threads(threads, folder.params.parameter_count())
    return load_model(folder, dtype=dtype, device=device, show_progress=show_progress)


@dataclass(frozen=True)
class DefaultsSource:
    """For --help: the checkpoint a run would open and what its generation.json sets over the built-in defaults."""

    directory: Path | None  # None when no checkpoint can be found or read (`problem` says why)
    file_settings: dict
    problem: str | None = None


def defaults_source(ckpt_dir: Path | None) -> DefaultsSource:
    """Never raises: help must print even when the checkpoint is missing or broken."""
    try:
        directory = Path(ckpt_dir) if ckpt_dir is not None else find_default_checkpoint()
        return DefaultsSource(directory, generation_file_settings(directory) if directory.is_dir() else {})
    except UserError as err:
        return DefaultsSource(None, {}, str(err))
