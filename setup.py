import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# Metadata lives in pyproject.toml; package_dir maps training/ to eeengine.training and the
# Triton kernels of kernels/ to eeengine.kernels (never a top-level package named kernels).
# eeengine._C holds the C++ ops of csrc/ (loaded by eeengine/_custom_ops.py; optional at run
# time: without it the engine falls back to the plain-torch reference with a warning).
SOURCES = ["csrc/exit_head.cpp", "csrc/token_prune.cpp", "csrc/torch_bindings.cpp"]
# The CUDA kernels of csrc/*.cu are built only against a CUDA torch with a CUDA toolkit (the CPU
# wheel cannot build them); they register the CUDA dispatch key under EEENGINE_CUDA.
WITH_CUDA = torch.version.cuda is not None and CUDA_HOME is not None

setup(
    package_dir={
        "eeengine": "eeengine",
        "eeengine.policies": "eeengine/policies",
        "eeengine.kernels": "kernels",
        "eeengine.training": "training",
        "eeengine.training.recipes": "training/recipes",
    },
    packages=[
        "eeengine",
        "eeengine.policies",
        "eeengine.kernels",
        "eeengine.training",
        "eeengine.training.recipes",
    ],
    ext_modules=[
        CUDAExtension(
            "eeengine._C",
            sources=[*SOURCES, "csrc/exit_head_cuda.cu"],
            define_macros=[("EEENGINE_CUDA", None)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        )
        if WITH_CUDA
        else CppExtension("eeengine._C", sources=SOURCES, extra_compile_args=["-O3"])
    ],
    cmdclass={"build_ext": BuildExtension},
)
