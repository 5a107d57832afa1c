"""model.forward for the decode loop: model.py's own functions, linked to faster code for the same arithmetic.

model.py calls its products (`matmul`, `matmuls`, `batched_matmul`) and `rms_norm`, `apply_rope`, `attend` by
name. Here every function of model.py is made again from its very code object (linking.py), but with a
namespace in which those names mean:

- the products: kernels.py's (the compiled one-row kernels, several matrices in one call, the row-block
  split for float32, the float32 route for attention's small products);
- `rms_norm`, `apply_rope`, `attend`: their compiled twins (compiled.py) where those apply -- decoding bf16
  on a CPU with AVX-512 BF16, kernels built and not switched off -- and model.py's own otherwise.

Nothing in model.py knows about this, so it reads as Llama 3, and stepping through it always lands in its
arithmetic: the decode loop (generate.decode) takes model.forward itself while a debugger or tracer is
active (`tracing`). tests/test_decode_steps.py holds every linked piece to model.py's own code.
"""

import sys
from collections.abc import Callable

from . import compiled, kernels, model
from .linking import linked


def with_twin(compiled_version: Callable, reference: Callable) -> Callable:
    """A function that tries `compiled_version` first and calls `reference` where it gives None (does not apply)."""
    def run(*args, **kwargs):
        out = compiled_version(*args, **kwargs)
        return reference(*args, **kwargs) if out is None else out
    run.__name__, run.__qualname__, run.__doc__ = reference.__name__, reference.__qualname__, reference.__doc__
    return run


def faster(namespace: dict) -> dict:
    return {
        "matmul": kernels.matmul, "matmuls": kernels.matmuls, "batched_matmul": kernels.batched_matmul,
        "rms_norm": with_twin(compiled.rms_norm, namespace["rms_norm"]),
        "apply_rope": with_twin(compiled.apply_rope, namespace["apply_rope"]),
        "attend": with_twin(compiled.attend, namespace["attend"]),  # its fallback multiplies by kernels' products
    }


FAST = linked(model, faster)
forward = FAST["forward"]  # model.forward's signature and results; the linked rms_norm, attend, ... by name too


def tracing() -> bool:
    """A debugger (pdb, an IDE's) or a tracer (coverage) is watching: run model.py's own functions then.
    (Python 3.12's sys.monitoring is the other way in, for debuggers that use it.)"""
    monitoring = getattr(sys, "monitoring", None)
    return sys.gettrace() is not None or (monitoring is not None and monitoring.get_tool(monitoring.DEBUGGER_ID) is not None)
