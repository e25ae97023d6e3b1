"""Models and hooks: load a local model directory safely (:mod:`.loading`), find each
layer's MLP down-projection, read or zero its coefficients during a forward pass
(:mod:`.hooks`), and build the random-init twin (:mod:`.twin`). May import ``kernels``."""

from specext.models.hooks import capture, mask  # noqa: F401
from specext.models.loading import (DTYPES, LoadedModel, MlpSite, ModelLoadError, find_mlp_sites,  # noqa: F401
                                    load_model, resolve_device, wrap_model)
