"""timm's parameter grouping for a wrapped backbone, so layer-wise learning-rate decay sees the exits.

timm's optimizer factory (`create_optimizer_v2(..., layer_decay=...)`) asks a model's `group_matcher()` which
depth each parameter belongs to. A wrapped model answers with its backbone's own groups, and puts every exit
(head and gate) in the group of the block it is attached to, so an exit after block 3 learns at block 3's rate;
an added final head joins the backbone's classifier group. Backbones without a `group_matcher` get timm's
automatic grouping (`auto_group_layers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn as nn

__all__ = ["exit_group_matcher"]


def _backbone_layers(backbone: nn.Module, coarse: bool) -> dict[str, int]:
    """Layer id of each backbone parameter, as timm's layer decay numbers them (the classifier last)."""
    from timm.models import group_parameters
    from timm.optim import auto_group_layers

    matcher = getattr(backbone, "group_matcher", None)
    groups = None
    if callable(matcher):
        try:
            groups = matcher(coarse=coarse)
        except NotImplementedError:
            groups = None
    if groups is None:
        return auto_group_layers(backbone)
    return group_parameters(backbone, groups, reverse=True)


def _attached_layer(backbone: nn.Module, module_name: str, layers: dict[str, int]) -> int:
    """Layer id of the block an exit is attached to: the deepest group among the module's own parameters, or,
    for a module without any, the group of the last parameter registered before it."""
    inside = [lid for name, lid in layers.items() if name.startswith(module_name + ".")]
    if inside:
        return max(inside)
    before = 0
    for name, module in backbone.named_modules():
        if name == module_name:
            return before
        for pname, _ in module.named_parameters(prefix=name, recurse=False):
            before = layers.get(pname, before)
    return before


def exit_group_matcher(
    backbone: nn.Module, exit_modules: Sequence[str], coarse: bool = False
) -> Callable[[str], tuple[int]]:
    """A timm group matcher (a callable from parameter name to group ordinal) for a wrapped model.

    Args:
        backbone: The wrapped backbone (the wrapper's `backbone` attribute).
        exit_modules: The backbone module each early exit is attached to, in exit order (`branches.i`).
        coarse: timm's coarse grouping (whole stages) instead of the fine one (blocks).

    Returns:
        `fn(name) -> (layer_id,)` for the wrapper's parameter names: `backbone.*` as the backbone groups them,
        `branches.i.*` in exit i's block's group, anything else (an added final head) in the last group.
    """
    layers = _backbone_layers(backbone, coarse)
    last = max(layers.values(), default=0)
    exit_layers = [_attached_layer(backbone, m, layers) for m in exit_modules]

    def match(name: str) -> tuple[int]:
        if name.startswith("backbone."):
            return (layers.get(name[len("backbone.") :], last),)
        if name.startswith("branches."):
            return (exit_layers[int(name.split(".")[1])],)
        return (last,)

    return match
