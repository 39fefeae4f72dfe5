"""The model room: Sana's parts (transformer, DC-AE VAE, Gemma-2 text encoder), the flow-matching
schedule, the optimizers table and the EMA.

Nothing here reads the environment: it receives the resolved config (and, to locate a model,
the resolved workspace and Hub settings).
Importing this package (and ``model.optimizers``) does not import torch, so config resolution
stays fast; the modules that build tensors import it.
"""

BUILTIN_MODEL = "builtin:tiny-sana"  # the demo's tiny Sana, built in code (model.parts)
# Sana 1.6B at real size with random weights, built in code on the run's device (model.parts.build_random_sana):
# the whole appliance at real size with no download, for benchmarks; it draws noise.
BUILTIN_RANDOM = "builtin:sana-1600m-random"
BUILTIN_MODELS = (BUILTIN_MODEL, BUILTIN_RANDOM)
