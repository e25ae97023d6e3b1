"""``python -m specext.finetune``: public path of :mod:`specext.pipelines.finetune` (the same module
object when imported; the command line when run)."""

import sys

from specext.pipelines import finetune as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
sys.modules[__name__] = _impl
