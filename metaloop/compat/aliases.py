"""Another library's module paths as metaloop's modules: ``import learn2learn.nn`` gives ``metaloop.compat.learn2learn.nn``.

:func:`alias_package` installs an :class:`AliasFinder` on ``sys.meta_path``. Every import of
``<alias>`` or ``<alias>.x.y`` then returns the *same module object* as
``<target>.x.y`` (``sys.modules`` holds one object under both names), so classes are never
duplicated: ``learn2learn.algorithms.MAML is metaloop.compat.learn2learn.algorithms.MAML``,
and ``isinstance`` and pickling behave as if only one library existed.

Unchanged learn2learn code runs once the alias is installed, either explicitly::

    from metaloop.compat.aliases import alias_package
    alias_package("learn2learn", "metaloop.compat.learn2learn")
    import learn2learn as l2l

or by putting a directory holding a one-line ``learn2learn/__init__.py`` shim on
``PYTHONPATH`` (``tests/compat/shims/`` is such a directory).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Sequence

__all__ = ["AliasFinder", "alias_package", "remove_alias"]


class _AliasLoader(importlib.abc.Loader):
    """Loads an alias name by importing its target and handing back the target's module object."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.target_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        """Returns the target module itself (imported now if needed), so no second copy is made."""
        module = importlib.import_module(self.target)
        self.target_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Restores the target's own ``__spec__``, which the import system replaced with the alias's."""
        module.__spec__ = self.target_spec


class AliasFinder(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder resolving ``alias`` and ``alias.<sub>`` to ``target`` and ``target.<sub>``.

    A submodule that the target does not have raises ``ModuleNotFoundError`` naming both
    paths, so a user sees at once which part of the aliased library metaloop does not provide.
    """

    def __init__(self, alias: str, target: str) -> None:
        self.alias = alias
        self.target = target

    def target_name(self, fullname: str) -> str | None:
        """Returns the target module name for ``fullname``, or None when ``fullname`` is not under the alias."""
        if fullname == self.alias:
            return self.target
        if fullname.startswith(self.alias + "."):
            return self.target + fullname[len(self.alias) :]
        return None

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        """Returns a spec whose loader hands back the target module, or None for names outside the alias.

        Raises:
            ModuleNotFoundError: if ``fullname`` is under the alias but the target has no such module.
        """
        name = self.target_name(fullname)
        if name is None:
            return None
        real = importlib.util.find_spec(name)
        if real is None:
            raise ModuleNotFoundError(
                f"{fullname} is not provided by metaloop: {name} does not exist; "
                "see metaloop's docs/compatibility.md (the learn2learn section) for what is provided",
                name=fullname,
            )
        is_package = real.submodule_search_locations is not None
        spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(name), is_package=is_package)
        if is_package:
            spec.submodule_search_locations = list(real.submodule_search_locations or [])
        return spec


def alias_package(alias: str, target: str) -> ModuleType:
    """Returns the target module after making ``import alias[.x.y]`` resolve to ``target[.x.y]``.

    Idempotent: a second call for the same alias replaces the first finder. Modules already
    imported under the alias are re-pointed at the target's objects.

    Raises:
        ModuleNotFoundError: if ``target`` cannot be imported.
    """
    remove_alias(alias)
    module = importlib.import_module(target)
    sys.meta_path.insert(0, AliasFinder(alias, target))
    sys.modules[alias] = module
    for name, mod in list(sys.modules.items()):
        if name.startswith(target + "."):
            sys.modules[alias + name[len(target) :]] = mod
    return module


def remove_alias(alias: str) -> None:
    """Removes the finder for ``alias`` and every ``sys.modules`` entry under the alias (targets stay imported)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not (isinstance(f, AliasFinder) and f.alias == alias)]
    for name in [n for n in sys.modules if n == alias or n.startswith(alias + ".")]:
        del sys.modules[name]
