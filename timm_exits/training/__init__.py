"""Training recipes and runs: recipe files, data, the trainer (one process or torchrun), checkpoints, run folders,
the evaluation report and the ``timm-exits`` command line. The top layer: builds on every other subpackage.
"""

__all__: list[str] = []  # the modules are the API; the public names are re-exported by `timm_exits`
