"""The model room: Sana's parts (transformer, DC-AE VAE, Gemma-2 text encoder), the flow-matching
schedule, the optimizers table and the EMA.

Nothing here reads the environment: it receives the resolved config (and, to locate a model,
the resolved workspace and Hub settings).
Importing this package (and ``model.optimizers``) does not import torch, so config resolution
stays fast; the modules that build tensors import it.
"""

BUILTIN_MODEL = "builtin:tiny-sana"  # the demo's tiny Sana, built in code (model.parts)
