"""Drop-in namespaces for code written against other meta-learning libraries.

``from metaloop.compat import learn2learn as l2l`` provides learn2learn's algorithms, ``nn``,
``optim`` and ``utils`` under learn2learn's names; :func:`metaloop.compat.aliases.alias_package`
(or the shim package in ``tests/compat/shims``) makes unchanged ``import learn2learn`` code use it.
"""
