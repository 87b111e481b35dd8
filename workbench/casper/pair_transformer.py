"""The old name of `workbench.casper.pairs` (Casper's challenge 2): the same public names, re-exported.

Settings such as ``ORIGINAL_MIN_AGREEMENT`` are read where they are defined (`workbench.casper.pairs.model`);
change them there.
"""

from workbench.casper.pairs import *  # noqa: F403
from workbench.casper.pairs import __all__  # noqa: F401
