"""Framework adapters over the neutral guard core (:mod:`stabilize.guard`).

Only modules in this package import torch, tensorflow or keras by name; each is
loaded on first use, so ``import stabilize`` loads no framework.
"""
