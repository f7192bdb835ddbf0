from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# Metadata lives in pyproject.toml; package_dir maps training/ to eeengine.training and the
# Triton kernels of kernels/ to eeengine.kernels (never a top-level package named kernels).
# eeengine._C holds the C++ ops of csrc/ (loaded by eeengine/_custom_ops.py; optional at run
# time: without it the engine falls back to the plain-torch reference with a warning).
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
        CppExtension(
            "eeengine._C",
            sources=["csrc/exit_head.cpp", "csrc/torch_bindings.cpp"],
            extra_compile_args=["-O3"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
