"""``specext.reference``: the plain-torch references, public path of :mod:`specext.kernels.reference` (the same module object)."""

import sys

from specext.kernels import reference as _impl

sys.modules[__name__] = _impl
