"""The configuration: the schema of every key, reading config files as written, the presets,
the validation rules, the prompt library, and resolution with provenance (resolve).

It sits above the component tables it offers as choices (model.optimizers, tracking) and
below everything that consumes a resolved config (data, run, cli).
"""
