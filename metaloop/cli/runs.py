"""Former path of :mod:`metaloop.cli.folders` (run folders), kept so that code importing it still runs."""

from metaloop.cli.folders import *  # noqa: F403
from metaloop.cli.folders import __all__  # noqa: F401
