"""What is measured: per-neuron specialisation (:mod:`.specialization`), its permutation
null (:mod:`.null_model`), the Parameter Specialization Score (:mod:`.pss`), accuracy
(:mod:`.accuracy`), correlations (:mod:`.correlation`) and bootstrap intervals
(:mod:`.bootstrap`). May import ``kernels``, ``models`` and ``probes``."""
