"""Builds the optional compiled decode kernels (llama3_raw/csrc/decode_kernels.c) with the package; the rest
of the project's metadata is in pyproject.toml.

`optional=True`: where no C compiler is found the build of this one module is skipped, and llama3_raw uses
PyTorch's products instead (llama3_raw/compiled.py). The kernels choose AVX-512 code at run time, so the
build needs no -march flag. OpenMP: the module links libgomp, and so shares the one PyTorch has loaded.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "llama3_raw._decode_kernels",
    sources=["llama3_raw/csrc/decode_kernels.c"],
    extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],  # no fused multiply-adds the source does not ask for
    extra_link_args=["-fopenmp"],
    optional=True,
)])
