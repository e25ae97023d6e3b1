"""The random-init twin: the same architecture with seeded random weights.

A probe's categories share template words ("capital", "currency"), so even a network that
knows nothing looks somewhat specialised on it. Running the twin on the same probe and
token positions measures that floor: a trained model's mean Gini and excess Gini mean
something only next to its twin's.

The twin is built from the model's own config by transformers' ``from_config`` (the
architecture's standard initialisation, e.g. normal(0, ``initializer_range``) for Llama)
under ``torch.manual_seed(seed)``, in the model's dtype, on its (input) device: a model
loaded with a device map gets a twin in one piece there, so it must fit. It shares the
tokenizer. Nothing is read from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from specext.models.loading import LoadedModel, find_mlp_sites

logger = logging.getLogger(__name__)


def random_twin(lm: LoadedModel, seed: int = 0) -> LoadedModel:
    """A :class:`LoadedModel` of ``lm``'s architecture with seeded random weights.

    Build it after ``lm`` is no longer needed when memory is tight: it takes as much memory
    as ``lm``'s weights. The global torch RNG state is restored afterwards."""
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModelForCausalLM if lm.has_lm_head else AutoModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = loader.from_config(lm.model.config, dtype=lm.dtype)
    model.to(lm.device).eval()
    sites = find_mlp_sites(model, lm.d_ff, lm.n_layers)
    if len(sites) != lm.n_layers or sites[0].d_ff != lm.d_ff:
        raise RuntimeError(f"the random twin has {len(sites)} MLP layers of width {sites[0].d_ff}, "
                           f"the model {lm.n_layers} of width {lm.d_ff}")
    logger.info("random-init twin of %s (seed %d)", lm.architecture, seed)
    # The twin is built whole on the input device, never split by the model's device map.
    return dataclasses.replace(lm, model=model, sites=sites, info={**lm.info, "random_twin_seed": seed},
                               layer_devices=[lm.device] * len(sites), device_map=None)
