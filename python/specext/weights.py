"""``specext.weights``: safetensors streaming of MLP weights, public path of :mod:`specext.kernels.weights` (the same module object)."""

import sys

from specext.kernels import weights as _impl

sys.modules[__name__] = _impl
