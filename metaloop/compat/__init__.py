"""Drop-in namespaces for code written against other meta-learning libraries.

``from metaloop.compat import learn2learn as l2l`` provides learn2learn's learnable
optimizers, transforms, Kronecker modules and module utilities under learn2learn's names.
"""
