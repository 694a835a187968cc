"""Inference on a multi-exit model: exit policies and the hard early-exit path, threshold calibration on held-out
outputs, and re-fitting the exit gates. Builds on `timm_exits.core`.
"""

__all__: list[str] = []  # the modules are the API; the public names are re-exported by `timm_exits`
