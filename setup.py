from setuptools import setup

# Metadata lives in pyproject.toml; package_dir maps training/ to eeengine.training.
setup(
    package_dir={
        "eeengine": "eeengine",
        "eeengine.policies": "eeengine/policies",
        "eeengine.training": "training",
        "eeengine.training.recipes": "training/recipes",
    },
    packages=["eeengine", "eeengine.policies", "eeengine.training", "eeengine.training.recipes"],
)
