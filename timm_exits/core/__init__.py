"""The multi-exit model itself: exit configuration, backbone layouts, exit placement, heads, gates, the
soft-conditional output, costs, the hook-based wrapper and the training losses.

The lowest layer: its modules import nothing from the rest of the package at run time (``EarlyExitModel``'s
convenience methods ``predict``, ``save_pretrained`` and ``push_to_hub`` import their implementation when called).
"""

__all__: list[str] = []  # the modules are the API; the public names are re-exported by `timm_exits`
