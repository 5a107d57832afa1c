"""model.py's functions again -- the same code objects -- with some of the names they call meaning other code.

model.py calls its pieces by name (`matmul`, `rms_norm`, `attend`, `regularized`, ...). `linked` makes every
function of a module anew from its own code object, with a namespace in which chosen names mean something
else: the decode step links faster kernels (fast_forward.py), training its dropout (training/dropout.py).
The arithmetic a reader follows in model.py, and the lines a debugger stops on, stay the same.
"""

import types
from collections.abc import Callable


def linked(module: types.ModuleType, replace: Callable[[dict], dict]) -> dict:
    """The module's own functions again, same code, looking up their global names in a new namespace:
    the module's, updated with `replace(namespace)` (which may use the new functions: they call by name)."""
    namespace = dict(vars(module))
    for name, value in vars(module).items():
        if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
            function = types.FunctionType(value.__code__, namespace, value.__name__, value.__defaults__, value.__closure__)
            function.__kwdefaults__, function.__doc__ = value.__kwdefaults__, value.__doc__
            namespace[name] = function
    namespace.update(replace(namespace))
    return namespace
