"""Training recipes and runs: recipe files, data, the trainer (one process or torchrun), checkpoints, run folders,
the evaluation report and the ``timm-exits`` command line. The top layer: builds on every other subpackage.
"""
