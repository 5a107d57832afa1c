"""The optional compiled decode kernels of llama3_raw (matvec.cpp), built against the torch already installed:

    pip install --no-build-isolation ./matvec

Needs a C++ compiler; runs on CPUs with AVX-512 BF16 (llama3_raw checks, and otherwise keeps to PyTorch's
own products, which are also what the tests compare these kernels with).
"""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    name="llama3_raw_matvec",
    version="0.1.0",
    description="AVX-512 one-row matrix products for llama3_raw's decoding",
    ext_modules=[CppExtension("llama3_raw_matvec", ["matvec.cpp"], extra_compile_args=["-O3"])],
    cmdclass={"build_ext": BuildExtension},
)
