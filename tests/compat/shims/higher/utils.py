"""``higher.utils``, served by :mod:`metaloop.utils`."""

from metaloop.utils import *  # noqa: F401,F403
from metaloop.utils import _copy_tensor, _find_param_in_list, _get_param_mapping, _is_container, _recursive_map  # noqa: F401
