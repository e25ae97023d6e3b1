"""``specext.ops``: the kernel API, public path of :mod:`specext.kernels.ops` (the same module object)."""

import sys

from specext.kernels import ops as _impl

sys.modules[__name__] = _impl
