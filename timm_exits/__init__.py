"""timm-exits: early exits and learned exit gates for any timm backbone.

import timm, timm_exits
model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10), exits="auto")
out = model(images)                                   # every exit, gates, soft output, expected cost
loss = timm_exits.SoftConditionalLoss(cost_weight=0.1)(out, targets)
"""

from . import models as _models  # noqa: F401  (registers alexnet_cifar with timm)
from ._version import __version__ as __version__
from .calibration import Calibration, Collected, calibrate, collect, simulate, sweep
from .config import ExitConfig
from .gate_fitting import GateFit, fit_gates
from .hub import ExitCheckpointError, from_pretrained, load_exits, push_to_hub, save_pretrained
from .losses import BranchyNetLoss, FinalExitLoss, SoftConditionalLoss, cross_entropy
from .model import EarlyExitModel, ExitBranch, ExitOutput, wrap
from .placement import ExitPoint, block_points, feature_points
from .planning import SplitPlan, plan_split
from .policies import POLICIES, Prediction, PredictionStats, predict
from .soft import exit_log_probs, expected_cost, soft_log_output
from .split import CloudPart, EdgePart, Split, SplitError, export, split

__all__ = [
    "POLICIES",
    "GateFit",
    "fit_gates",
    "CloudPart",
    "EdgePart",
    "Split",
    "SplitError",
    "SplitPlan",
    "export",
    "plan_split",
    "split",
    "ExitCheckpointError",
    "from_pretrained",
    "load_exits",
    "push_to_hub",
    "save_pretrained",
    "Calibration",
    "Collected",
    "Prediction",
    "PredictionStats",
    "calibrate",
    "collect",
    "predict",
    "simulate",
    "sweep",
    "BranchyNetLoss",
    "EarlyExitModel",
    "ExitBranch",
    "ExitConfig",
    "ExitOutput",
    "ExitPoint",
    "FinalExitLoss",
    "SoftConditionalLoss",
    "block_points",
    "cross_entropy",
    "exit_log_probs",
    "expected_cost",
    "feature_points",
    "soft_log_output",
    "wrap",
]
