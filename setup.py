from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# Metadata lives in pyproject.toml; package_dir maps training/ to eeengine.training.
# eeengine._C holds the C++ ops of csrc/ (loaded by eeengine/_custom_ops.py; optional at run
# time: without it the engine falls back to the plain-torch reference with a warning).
setup(
    package_dir={
        "eeengine": "eeengine",
        "eeengine.policies": "eeengine/policies",
        "eeengine.training": "training",
        "eeengine.training.recipes": "training/recipes",
    },
    packages=["eeengine", "eeengine.policies", "eeengine.training", "eeengine.training.recipes"],
    ext_modules=[
        CppExtension(
            "eeengine._C",
            sources=["csrc/exit_head.cpp", "csrc/token_prune.cpp", "csrc/torch_bindings.cpp"],
            extra_compile_args=["-O3"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
