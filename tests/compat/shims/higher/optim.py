"""``higher.optim``, served by :mod:`metaloop.optim`."""

from metaloop.optim import *  # noqa: F401,F403
from metaloop.optim import (  # noqa: F401  (higher's private names that public code uses)
    _add,
    _addcdiv,
    _addcmul,
    _get_mask_closure,
    _GradCallbackType,
    _GradClosureType,
    _GroupedGradsType,
    _maybe_mask,
    _OverrideType,
)
