"""``higher.patch``, served by :mod:`metaloop.patch`."""

from metaloop.patch import *  # noqa: F401,F403
from metaloop.patch import _internal_attrs, _MonkeyPatchBase  # noqa: F401
