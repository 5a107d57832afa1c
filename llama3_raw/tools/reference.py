"""Meta's reference Transformer (llama_models/llama3/model.py) run on this project's weight dict.

Optional: needs the test/bench-only packages `fairscale` and `llama-models`. The reference is
built on PyTorch's "meta" device and then handed our tensors with `assign=True`, so it shares the
weights instead of copying them: comparing an 8B model needs memory for one set of weights.
"""

import contextlib
import os
import socket
import sys

import torch

from ..errors import UserError
from ..params import ModelParams

INSTALL_HINT = "pip install fairscale==0.4.13 && pip install --no-deps llama-models"


def import_reference():
    try:
        import fairscale.nn.model_parallel.initialize as fs_init
        from llama_models.llama3 import model as meta_model
        from llama_models.llama3.args import ModelArgs
    except ImportError:
        raise UserError(f"Meta's reference code is not installed; install it with `{INSTALL_HINT}`.") from None
    return fs_init, meta_model, ModelArgs


def init_model_parallel() -> None:
    """fairscale needs a process group even for one process: world size 1 on the gloo backend."""
    fs_init, _, _ = import_reference()
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        with contextlib.redirect_stdout(sys.stderr):  # fairscale prints its set-up; stdout may be JSON
            fs_init.initialize_model_parallel(1)


def meta_transformer(params: ModelParams, weights: dict[str, torch.Tensor], max_seq_len: int, max_batch_size: int = 1):
    """Meta's Transformer holding exactly `weights` (strict load, shared storage) and a cache in their dtype."""
    _, meta_model, ModelArgs = import_reference()
    init_model_parallel()
    fields = params.to_json_dict()
    fields.pop("max_seq_len", None)
    args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **fields)
    with torch.device("meta"):
        model = meta_model.Transformer(args)
    model.load_state_dict(weights, strict=True, assign=True)
    # What __init__ made on the meta device besides parameters: the RoPE table and the caches.
    device, dtype = weights["tok_embeddings.weight"].device, weights["tok_embeddings.weight"].dtype
    model.freqs_cis = meta_model.precompute_freqs_cis(
        params.head_dim, max_seq_len * 2, params.rope_theta, params.use_scaled_rope).to(device)
    cache_shape = (max_batch_size, max_seq_len, params.n_kv_heads, params.head_dim)
    for layer in model.layers:
        layer.attention.cache_k = torch.zeros(cache_shape, dtype=dtype, device=device)
        layer.attention.cache_v = torch.zeros(cache_shape, dtype=dtype, device=device)
    return model.eval()


def meta_block_outputs(model, tokens: torch.Tensor, start_pos: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output (captured with forward hooks) and the logits of one reference forward."""
    outputs = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone()))
             for layer in model.layers]
    try:
        logits = model.forward(tokens, start_pos)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, logits
