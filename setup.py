import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# Metadata lives in pyproject.toml. Packages are discovered under two roots, both in the
# eeengine.* namespace: eeengine/ (the Triton kernels in eeengine/kernels/: a top-level folder
# named kernels would shadow the `kernels` package transformers >= 5 imports whenever the
# repository root is on sys.path) and training/ (as eeengine.training). data/ travels in the
# wheel as eeengine/_data (eeengine.data finds it), so the first run trains on SST-2 from any
# directory.
# eeengine._C holds the C++ ops of csrc/ (loaded by eeengine/_custom_ops.py; optional at run
# time: without it the engine falls back to the plain-torch reference with a warning).
SOURCES = [
    "csrc/exit_head.cpp",
    "csrc/seeded_dropout.cpp",
    "csrc/token_prune.cpp",
    "csrc/torch_bindings.cpp",
]
# The CUDA kernels of csrc/*.cu are built only against a CUDA torch with a CUDA toolkit (the CPU
# wheel cannot build them); they register the CUDA dispatch key under EEENGINE_CUDA.
WITH_CUDA = torch.version.cuda is not None and CUDA_HOME is not None

ROOTS = {"eeengine": "eeengine", "eeengine.training": "training"}
PACKAGES = [
    f"{name}.{sub}" if sub else name
    for name, folder in ROOTS.items()
    for sub in ["", *find_packages(folder)]
]

setup(
    package_dir={**ROOTS, "eeengine._data": "data"},
    packages=[*PACKAGES, "eeengine._data"],
    package_data={"eeengine._data": ["README.md", "MANIFEST.sha256", "*/*"]},
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
