"""A first look at the kernels: category mass of synthetic MLP activations -> per-neuron
specialisation, checked against the plain-torch reference. Runs in a few seconds on a CPU.

    .venv/bin/python scripts/kernel_example.py
"""

import time

import torch

import specext
from specext import ops, reference

torch.manual_seed(0)
T, N, C = 8192, 4096, 6  # tokens, MLP width, categories
labels = torch.randint(0, C, (T,))
# Activations where the first 512 neurons fire mostly for "their" category.
acts = torch.randn(T, N) * 0.1
owner = torch.arange(512) % C
acts[:, :512] += (labels[:, None] == owner[None, :]).float() * 2.0
acts = acts.bfloat16()

# The first call of any torch custom op imports torch._dynamo (about a second, once).
ops.neuron_specialization(ops.category_accumulate(acts[:8], labels[:8], C)[0] + 1)

t0 = time.perf_counter()
sums, counts = ops.category_accumulate(acts, labels, C)  # stat = |a|
stats = ops.neuron_specialization(sums / counts[:, None])  # mean |a| per category
t_ours = time.perf_counter() - t0

t0 = time.perf_counter()
ref_s, ref_c = reference.category_accumulate(acts, labels, C)
ref = reference.neuron_specialization(ref_s / ref_c[:, None], dtype=torch.float32)
t_ref = time.perf_counter() - t0

print("build:", specext.build_info())
print(f"acts {tuple(acts.shape)} {acts.dtype}, {C} categories")
print(f"specialised neurons [:512]  mean Gini {stats.gini[:512].mean():.3f}, "
      f"mean normalised entropy {stats.norm_entropy[:512].mean():.3f}, "
      f"top category correct {(stats.top_category[:512] == owner).float().mean():.0%}")
print(f"other neurons [512:]        mean Gini {stats.gini[512:].mean():.3f}, "
      f"mean normalised entropy {stats.norm_entropy[512:].mean():.3f}")
print(f"max |gini - reference| = {(stats.gini - ref.gini).abs().max():.2e}")
print(f"specext {t_ours * 1e3:.1f} ms, plain torch {t_ref * 1e3:.1f} ms ({t_ref / t_ours:.1f}x)")
