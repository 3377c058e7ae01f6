"""Packaging beyond pyproject.toml: the top-level configs/ and recipes/ ship inside the wheel.

They stay at the top of the repository (where recipes are read and edited) and install as
``metaloop/configs`` and ``metaloop/recipes``, which :func:`metaloop.cli.config_dir` and
:func:`metaloop.cli.recipe_dir` find when metaloop is not an editable checkout.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["metaloop", "metaloop.*"]), "metaloop.configs", "metaloop.recipes"],
    package_dir={"metaloop.configs": "configs", "metaloop.recipes": "recipes"},
    package_data={
        "metaloop": ["py.typed"],
        "metaloop.tasks": ["data/omniglot/*.zip", "data/omniglot/LICENSE", "data/omniglot/README.md"],
        "metaloop.configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"],
        "metaloop.recipes": ["*.yaml"],
    },
)
