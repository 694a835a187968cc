"""Deployment across tiers: split a multi-exit model into an edge and a cloud part, export the parts, plan where to
split, and serve on Ray Serve (`timm_exits.deploy.serve`, which imports Ray only when a deployment is built).
Builds on `timm_exits.core` and `timm_exits.inference`.
"""

__all__: list[str] = []  # the modules are the API; the public names are re-exported by `timm_exits`
