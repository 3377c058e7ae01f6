"""A ``learn2learn`` that is metaloop: put ``tests/compat/shims`` on ``PYTHONPATH`` and ``import learn2learn`` runs on metaloop.

Importing this package replaces itself in ``sys.modules`` by :mod:`metaloop.compat.learn2learn`
and installs an alias finder, so every ``learn2learn.x.y`` is ``metaloop.compat.learn2learn.x.y``
(the same module objects, no duplicate classes).
"""

from metaloop.compat.aliases import alias_package

alias_package("learn2learn", "metaloop.compat.learn2learn")
