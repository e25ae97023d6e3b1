"""The native kernels and their Python face.

- :mod:`specext.kernels.ops`: ``category_accumulate``, ``neuron_specialization``,
  ``value_vector_norms`` as ``torch.library`` custom ops and numpy functions over the
  compiled extension (``specext._native``);
- :mod:`specext.kernels.reference`: the plain-torch oracles (tests) and baselines (benchmarks);
- :mod:`specext.kernels.weights`: MLP down-projections streamed from safetensors.

Imports nothing of the rest of the package. Public as ``specext.ops``, ``specext.reference``
and ``specext.weights``.
"""
