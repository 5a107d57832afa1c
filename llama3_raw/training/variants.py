"""The lab's variants of Llama 3 (python -m llama3_raw.lab): model.py's own forward with one piece swapped.

Each variant is what the seeds add one at a time, taken back out: a LayerNorm where Llama 3 has RMSNorm, no
rotary embeddings, a ReLU MLP of the same parameter count where it has SwiGLU, full multi-head attention where
it has grouped-query attention, one block where it has several, characters where it has BPE, no causal mask.

model.py calls its pieces by name (`rms_norm`, `apply_rope`, `causal_mask`, `feed_forward`); a variant
links its own function to that name in model.py's own functions (linking.py), exactly as training links its
dropout (dropout.py), so model.py stays Llama 3 alone and a variant differs from it in that one piece. The
shape changes (MHA, one block) and the tokenizer are recipe settings: no code at all.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model import Tensor, Weights, at_least_fp32, matmul
from ..params import ModelParams
from ..parallel import SINGLE_PROCESS, Ranks

Swap = Callable[[dict], dict]  # model.py's namespace -> the names it gives other functions


def layer_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LayerNorm where Llama 3 has RMSNorm: subtract the mean first, then divide by the standard deviation.
    With a gain and no bias, so that it differs from rms_norm in the centring alone (the bias is a separate
    question: RMSNorm's paper asks about the centring) and every weight keeps Meta's name and shape."""
    x32 = at_least_fp32(x)
    centred = x32 - x32.mean(-1, keepdim=True)
    normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def no_rotation(x: Tensor, rotations: Tensor) -> Tensor:
    """No positional information: q and k as they are, whatever their position."""
    return x


def no_mask(positions: Tensor, start: int, dtype: torch.dtype, device="cpu") -> None:
    """No causal mask: every token sees every other, the ones after it included."""
    return None


def relu_feed_forward(x: Tensor, weights: Weights, layer: int, ranks: Ranks = SINGLE_PROCESS) -> Tensor:
    """The MLP before gated units: relu(x W1) W2, with 3/2 of SwiGLU's hidden units, so that its two matrices
    hold the parameters of SwiGLU's three."""
    p = f"layers.{layer}.feed_forward."
    hidden = F.relu(matmul(x, weights[p + "w1.weight"]))  # (B, S, 3/2 hidden)
    return ranks.all_reduce(matmul(hidden, weights[p + "w2.weight"]))  # (B, S, D)


def relu_shapes(params: ModelParams) -> dict[str, tuple[int, ...]]:
    """Llama 3's weights with w1 (3H/2, D) and w2 (D, 3H/2) for the ReLU MLP, and no w3."""
    hidden = 3 * params.ffn_hidden_dim // 2
    shapes = {}
    for key, shape in params.weight_shapes().items():
        if key.endswith("feed_forward.w1.weight"):
            shapes[key] = (hidden, params.dim)
        elif key.endswith("feed_forward.w2.weight"):
            shapes[key] = (params.dim, hidden)
        elif not key.endswith("feed_forward.w3.weight"):
            shapes[key] = shape
    return shapes


@dataclass(frozen=True)
class Variant:
    name: str  # the lab's --variants name, and the run's folder
    label: str  # in the picture and the table
    teaches: str  # what taking the piece out shows
    model: dict = field(default_factory=dict)  # params.json fields that change
    tokenizer_kind: str = "bpe"
    swap: Swap | None = None  # model.py's names that mean other functions
    shapes: Callable[[ModelParams], dict] | None = None  # the weights, when they are not Llama 3's

    @property
    def is_llama3(self) -> bool:
        """Llama 3's own arithmetic (only sizes or the tokenizer differ): exported runs load in run.py."""
        return self.swap is None and self.shapes is None

    def weight_shapes(self, params: ModelParams) -> dict[str, tuple[int, ...]]:
        return params.weight_shapes() if self.shapes is None else self.shapes(params)


LLAMA3 = Variant("llama3", "Llama 3 (RMSNorm, RoPE, SwiGLU, GQA, all blocks, BPE)", "the reference: every piece in")
VARIANTS = {variant.name: variant for variant in [
    LLAMA3,
    Variant("layernorm", "LayerNorm for RMSNorm", "does the re-centring that RMSNorm drops help?",
            swap=lambda _: {"rms_norm": layer_norm}),
    Variant("no_rope", "no RoPE (no positions)", "order only through the causal mask (the first block sees a "
            "bag of tokens)",
            swap=lambda _: {"apply_rope": no_rotation}),
    Variant("relu_mlp", "ReLU MLP for SwiGLU (same parameters)", "what the gate buys at the same size",
            swap=lambda _: {"feed_forward": relu_feed_forward}, shapes=relu_shapes),
    Variant("mha", "MHA for GQA (a kv head per query head)", "what sharing key/value heads costs in loss, and "
            "saves in cache", model={"n_kv_heads": None}),
    Variant("one_block", "one block for the full depth", "what depth buys", model={"n_layers": 1}),
    Variant("char", "character tokenizer for BPE", "what merges buy: more text per token of context",
            tokenizer_kind="char"),
    Variant("no_mask", "no causal mask", "a validation loss too good to be true: each position sees the token it "
            "is to predict, and cannot write without it", swap=lambda _: {"causal_mask": no_mask}),
]}


def variant_named(name: str | None) -> Variant:
    """A recipe's variant: Llama 3 itself for None."""
    return LLAMA3 if name is None else VARIANTS[name]


def variant_model(variant: Variant, model: dict) -> dict:
    """The recipe's model fields with the variant's changes (n_kv_heads None: as many as the query heads)."""
    changed = {**model, **variant.model}
    if "n_kv_heads" in variant.model and variant.model["n_kv_heads"] is None:
        changed["n_kv_heads"] = changed["n_heads"]
    return changed
