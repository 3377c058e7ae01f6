"""Packaging beyond pyproject.toml: the top-level configs/ and recipes/ ship inside the wheel.

They stay at the top of the repository (where recipes are read and edited) and install as
``metaloop/configs`` and ``metaloop/recipes``, which :func:`metaloop.cli.config_dir` and
:func:`metaloop.cli.recipe_dir` find when metaloop is not an editable checkout. Their folders
are data packages (YAML only), one per config group.
"""

from setuptools import find_namespace_packages, find_packages, setup

DATA = {
    "metaloop.configs": "configs",
    **{f"metaloop.configs.{group}": f"configs/{group.replace('.', '/')}" for group in find_namespace_packages(where="configs")},
    "metaloop.recipes": "recipes",
}

setup(
    # hydra_plugins.metaloop_launcher: launcher=submitit_slurm's launcher (Hydra loads launchers from hydra_plugins only)
    packages=[*find_packages(include=["metaloop", "metaloop.*"]), *find_namespace_packages(include=["hydra_plugins.*"]), *DATA],
    package_dir=DATA,
    package_data={
        "metaloop": ["py.typed"],
        "metaloop.tasks": ["data/omniglot/*.zip", "data/omniglot/LICENSE", "data/omniglot/README.md"],
        **{package: ["*.yaml"] for package in DATA},
    },
)
