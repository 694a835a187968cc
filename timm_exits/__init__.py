"""timm-exits: early exits and learned exit gates for any timm backbone.

import timm, timm_exits
model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10), exits="auto")
out = model(images)                                   # every exit, gates, soft output, expected cost
loss = timm_exits.SoftConditionalLoss(cost_weight=0.1)(out, targets)
"""

from ._version import __version__ as __version__
from .core.config import ExitConfig
from .core.losses import BranchyNetLoss, FinalExitLoss, SoftConditionalLoss, cross_entropy
from .core.model import EarlyExitModel, ExitBranch, ExitOutput, wrap
from .core.placement import ExitPoint, block_points, feature_points
from .core.soft import exit_log_probs, expected_cost, soft_log_output
from .deploy.export import export
from .deploy.planning import SplitPlan, plan_split
from .deploy.split import CloudPart, EdgePart, Split, SplitError, split
from .hub import ExitCheckpointError, from_pretrained, load_exits, push_to_hub, save_pretrained
from .inference.calibration import Calibration, Collected, calibrate, collect, simulate, sweep
from .inference.gate_fitting import GateFit, fit_gates
from .inference.hard_exit import Prediction, PredictionStats, predict
from .inference.policies import POLICIES
from .training import models as _models  # noqa: F401  (registers alexnet_cifar and vgg13_cifar with timm)

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
