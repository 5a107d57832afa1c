"""Model hyper-parameters: Meta's `params.json` as a frozen dataclass, with every derived size in one place."""

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import UserError
from .files import read_json

# Llama 3 was trained with an 8K context; Llama 3.1 and later (the ones with `use_scaled_rope`) with 128K.
LLAMA3_CONTEXT = 8192
LLAMA31_CONTEXT = 131072

# Meta's frequency scaling for Llama 3.1+ RoPE (`apply_scaling` in llama_models/llama3/model.py hard-codes
# these). They are the defaults of the rope_* fields below, which a Hugging Face config.json may override
# (Llama 3.2 1B/3B's says factor 32).
ROPE_SCALE_FACTOR = 8.0
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192


@dataclass(frozen=True)
class ModelParams:
    dim: int  # width of the residual stream
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads; fewer than n_heads is grouped-query attention
    vocab_size: int
    multiple_of: int  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None
    norm_eps: float
    rope_theta: float
    use_scaled_rope: bool = False
    max_seq_len: int = 0  # 0: the model family's own context (8K, or 128K with scaled RoPE)
    # Only read when use_scaled_rope is set; Meta's params.json never carries them, so Meta's constants apply.
    rope_scaling_factor: float = ROPE_SCALE_FACTOR
    rope_low_freq_factor: float = ROPE_LOW_FREQ_FACTOR
    rope_high_freq_factor: float = ROPE_HIGH_FREQ_FACTOR
    rope_original_context: int = ROPE_ORIGINAL_CONTEXT

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"'{name}' must be a positive integer, not {value!r}")
        for name in ("norm_eps", "rope_theta", "rope_scaling_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor", "rope_original_context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"'{name}' must be a positive number, not {value!r}")
        if self.ffn_dim_multiplier is not None and (
            isinstance(self.ffn_dim_multiplier, bool)
            or not isinstance(self.ffn_dim_multiplier, (int, float))
            or not self.ffn_dim_multiplier > 0
        ):
            raise ValueError(f"'ffn_dim_multiplier' must be a positive number or null, not {self.ffn_dim_multiplier!r}")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"'use_scaled_rope' must be true or false, not {self.use_scaled_rope!r}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 0:
            raise ValueError(f"'max_seq_len' must be a non-negative integer, not {self.max_seq_len!r}")
        if not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"'rope_high_freq_factor' {self.rope_high_freq_factor} must exceed "
                             f"'rope_low_freq_factor' {self.rope_low_freq_factor}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} (dim / n_heads) must be even for rotary embeddings")

    # ---- derived sizes: the only place they are computed ----

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def heads_per_kv_head(self) -> int:
        """How many query heads share one key/value head (Meta's `n_rep`)."""
        return self.n_heads // self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size, exactly as Meta's FeedForward computes it from 4 * dim."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def context_len(self) -> int:
        if self.max_seq_len:
            return self.max_seq_len
        return LLAMA31_CONTEXT if self.use_scaled_rope else LLAMA3_CONTEXT

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of a checkpoint, in Meta's key order, with the shape these params imply."""
        kv_dim = self.n_kv_heads * self.head_dim
        shapes = {"tok_embeddings.weight": (self.vocab_size, self.dim)}
        for i in range(self.n_layers):
            shapes[f"layers.{i}.attention.wq.weight"] = (self.n_heads * self.head_dim, self.dim)
            shapes[f"layers.{i}.attention.wk.weight"] = (kv_dim, self.dim)
            shapes[f"layers.{i}.attention.wv.weight"] = (kv_dim, self.dim)
            shapes[f"layers.{i}.attention.wo.weight"] = (self.dim, self.n_heads * self.head_dim)
            shapes[f"layers.{i}.feed_forward.w1.weight"] = (self.ffn_hidden_dim, self.dim)
            shapes[f"layers.{i}.feed_forward.w2.weight"] = (self.dim, self.ffn_hidden_dim)
            shapes[f"layers.{i}.feed_forward.w3.weight"] = (self.ffn_hidden_dim, self.dim)
            shapes[f"layers.{i}.attention_norm.weight"] = (self.dim,)
            shapes[f"layers.{i}.ffn_norm.weight"] = (self.dim,)
        shapes["norm.weight"] = (self.dim,)
        shapes["output.weight"] = (self.vocab_size, self.dim)
        return shapes

    def parameter_count(self) -> int:
        """The sum over weight_shapes(), by arithmetic: it sizes a params.json before any table is built."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = 2 * self.dim * self.n_heads * self.head_dim + 2 * kv_dim * self.dim  # wq, wo; wk, wv
        per_layer = attention + 3 * self.ffn_hidden_dim * self.dim + 2 * self.dim  # w1, w2, w3; two norms
        return 2 * self.vocab_size * self.dim + self.n_layers * per_layer + self.dim  # embeddings, output; norm

    def to_json_dict(self) -> dict:
        """The params.json fields Meta writes (max_seq_len and the RoPE scaling constants only when set)."""
        out = asdict(self)
        for f in fields(self):
            if f.name.startswith("rope_") and f.name != "rope_theta" and out[f.name] == f.default:
                del out[f.name]
        if not out["max_seq_len"]:
            del out["max_seq_len"]
        if not out["use_scaled_rope"]:
            del out["use_scaled_rope"]
        return out


def ffn_fields(dim: int, hidden: int) -> dict:
    """params.json's multiple_of and ffn_dim_multiplier for a model that states its SwiGLU width `hidden`
    (Hugging Face's intermediate_size, GGUF's feed_forward_length) where Meta derives it from dim. Rounding up
    to a multiple of `hidden` gives exactly `hidden` whenever Meta's formula lands in (0, hidden], which a
    multiplier of hidden / (8 dim / 3) guarantees; the caller checks ffn_hidden_dim."""
    base = int(2 * (4 * dim) / 3)
    return {"multiple_of": hidden, "ffn_dim_multiplier": None if base <= hidden else hidden / base}


REQUIRED_FIELDS = ("dim", "n_layers", "n_heads", "vocab_size", "norm_eps")
DEFAULTS = {"multiple_of": 256, "ffn_dim_multiplier": None, "rope_theta": 500000.0, "use_scaled_rope": False, "max_seq_len": 0}
# The other fields (the RoPE scaling constants) take the dataclass's defaults when absent.


def params_from_dict(raw: dict) -> ModelParams:
    """Build params from a params.json-style dict; raises ValueError naming the bad field."""
    if not isinstance(raw, dict):
        raise ValueError("it must hold a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in raw]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    known = {f.name for f in fields(ModelParams)}
    values = {**DEFAULTS, **{k: v for k, v in raw.items() if k in known}}  # unknown fields are ignored, as Meta does
    if values.get("n_kv_heads") is None:
        values["n_kv_heads"] = values["n_heads"]
    return ModelParams(**values)


def load_params(path: str | Path) -> ModelParams:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; every checkpoint directory needs Meta's params.json beside its .pth files.")
    raw = read_json(path, "restore the params.json that came with the checkpoint")
    try:
        return params_from_dict(raw)
    except ValueError as err:
        raise UserError(f"{path} is not a usable Llama 3 params.json: {err}; restore the file that came with the checkpoint.") from None
