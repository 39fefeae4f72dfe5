"""The data: the dataloader config (backends), discovery into a plan with a data report (plan),
image probing and transforms (images), the bucketed sampler, the content-keyed caches and
their filling (precompute), and the demo's generated dataset (demo).
"""
