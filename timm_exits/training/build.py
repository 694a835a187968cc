"""The model a recipe describes: its timm backbone with the weights it names, and the exits attached to it."""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from ..core.model import EarlyExitModel, wrap
from .recipe_schema import ModelSection
from .recipe_types import RecipeError

__all__ = [
    "build_model",
]


# ------------------------------------------------------------------------------------------- model
def _create_backbone(spec: ModelSection, num_classes: int, load: bool) -> tuple[nn.Module, bool]:
    """The recipe's timm model, with the weights it names (``weights``) or timm's pretrained ones, and whether its
    classifier kept its initialisation (the weights were made for another number of classes)."""
    import timm

    name, weights = spec.model, spec.weights
    if weights and weights.startswith("local-dir:"):
        weights = "local-dir:" + str(Path(weights.removeprefix("local-dir:")).expanduser())
    kwargs = dict(spec.model_kwargs or {})
    if load and weights and weights.startswith("local-dir:"):
        _check_weights_folder(Path(weights.removeprefix("local-dir:")))
    try:
        if load and weights and weights.startswith(("local-dir:", "hf-hub:")):
            backbone = timm.create_model(weights, pretrained=True, num_classes=num_classes, **kwargs)
            arch = backbone.pretrained_cfg.get("architecture")
            if arch != name:
                raise RecipeError(
                    f"weights {weights!r} hold a {arch!r}, but the recipe's model is {name!r}; set model: {arch}."
                )
            return backbone, _classes_differ(backbone, num_classes)
        backbone = timm.create_model(name, pretrained=load and not weights, num_classes=num_classes, **kwargs)
        if load and weights:
            return backbone, _load_weights_file(backbone, Path(weights).expanduser())
        return backbone, load and _classes_differ(backbone, num_classes)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise RecipeError(f"unknown timm model {name!r}; close names: {close}.") from e
        if not load:
            raise
        raise RuntimeError(_weights_hint(name, weights, e)) from e
    except TypeError as e:
        if kwargs and "unexpected keyword argument" in str(e):
            raise RecipeError(f"model_kwargs {kwargs} are not all arguments of {name!r} ({e}).") from e
        raise
    except (RecipeError, FileNotFoundError):
        raise
    except Exception as e:
        if kwargs and not load and isinstance(e, (ValueError, AssertionError)):  # timm's checks of its arguments
            raise RecipeError(
                f"recipe key 'model_kwargs' {kwargs} does not fit model {name!r} ({type(e).__name__}: {e})."
            ) from e
        if not load:
            raise
        raise RuntimeError(_weights_hint(name, weights, e)) from e


def _classes_differ(backbone: nn.Module, num_classes: int) -> bool:
    """Whether timm's pretrained weights were made for another number of classes (timm then skips the classifier)."""
    return (backbone.pretrained_cfg or {}).get("num_classes", num_classes) != num_classes


def _load_weights_file(backbone: nn.Module, path: Path) -> bool:
    """Load a timm model's weights file (safetensors or a torch state dict); a classifier of another size is skipped.

    Returns:
        Whether the classifier kept its initialisation (the file holds none of its size).
    """
    from timm.models import load_state_dict

    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} not found; give a file saved from a timm model, or local-dir:FOLDER / "
            "hf-hub:ORG/NAME for a folder saved by timm or timm-exits."
        )
    state = load_state_dict(str(path))
    own = backbone.state_dict()
    head = backbone.pretrained_cfg.get("classifier")
    heads = tuple(f"{h}." for h in ([head] if isinstance(head, str) else list(head or [])))
    for key in [k for k in state if k.startswith(heads)]:
        if key in own and state[key].shape != own[key].shape:
            del state[key]  # another number of classes: the new head keeps its initialisation
    resized = [k for k in state if k in own and state[k].shape != own[k].shape]  # e.g. another img_size
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})" for k in resized[:5]]
    for key in resized:
        del state[key]
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    fresh = any(k.startswith(heads) for k in missing)
    missing = [k for k in missing if not k.startswith(heads) and k not in resized]
    if missing or unexpected or resized:
        raise RecipeError(
            f"weights file {str(path)!r} does not fit {backbone.pretrained_cfg.get('architecture')!r}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}, of another shape {shapes}; check the "
            "recipe's model and model_kwargs."
        )
    return fresh


def _check_weights_folder(folder: Path) -> None:
    """Refuse a ``weights: local-dir:`` folder timm could not load from, saying what the folder lacks."""
    if not (folder / "config.json").is_file():
        what = f"{str(folder)!r} has no config.json" if folder.is_dir() else f"folder {str(folder)!r} not found"
        raise FileNotFoundError(
            f"weights local-dir: {what}; give a folder saved by timm (save_for_hf) or timm-exits "
            "(save_pretrained), or the path of a weights file."
        )


def _weights_hint(name: str, weights: str | None, e: Exception) -> str:
    if weights:
        return f"could not load the weights {weights!r} into {name!r} ({type(e).__name__}: {e})."
    return (
        f"could not load pretrained weights for {name!r} ({type(e).__name__}: {e}). Without network access, fill the "
        "Hugging Face cache first, point weights: at a local copy, or set pretrained: false."
    )


def build_model(
    spec: ModelSection,
    num_classes: int,
    img_size: int,
    pretrained: bool | None = None,
    *,
    classifier_trained: bool = True,
) -> EarlyExitModel:
    """Create the model section's timm backbone, load the weights it asks for, and attach its exits.

    Args:
        spec: The recipe's model section (``recipe.model``).
        num_classes: Classes of the data set.
        img_size: Input size (``recipe.data.img_size``), at which the exits' costs are measured.
        pretrained: Load the backbone's weights (``weights``, else timm's pretrained ones); default: whether
            the section sets ``pretrained`` or ``weights``.
        classifier_trained: Whether a training stage trains the backbone's classifier; if not, weights made for
            another number of classes (which leave it at its initialisation) are refused.

    Returns:
        The `EarlyExitModel` (on the CPU).
    """
    from . import models as _models  # noqa: F401  (registers alexnet_cifar and vgg13_cifar with timm)

    load = bool(spec.pretrained or spec.weights) if pretrained is None else bool(pretrained)
    backbone, fresh = _create_backbone(spec, num_classes, load)
    if fresh and not classifier_trained:
        raise RecipeError(
            f"the weights of {spec.model!r} were made for another number of classes than the data's {num_classes}, "
            "so its classifier starts untrained, and no stage trains it (epochs: 0, frozen_train_classifier: "
            "false): the final exit would stay random. Set frozen_train_classifier: true or epochs above 0."
        )
    size = int(img_size)
    try:
        return wrap(
            backbone,
            exits=spec.exits,
            num_classes=num_classes,
            head=spec.head,
            gate=spec.gate,
            costs=spec.costs,
            input_size=(3, size, size),
            head_hidden=spec.head_hidden,
            gate_hidden=spec.gate_hidden,
            gate_bias=spec.gate_bias,
            detach_gate_inputs=spec.detach_gate_inputs,
            drop_rate=spec.exit_drop_rate,
        )
    except ValueError as e:  # wrap's message names its argument (exits, costs, head_hidden, ...)
        raise RecipeError(f"the recipe's model keys do not fit model {spec.model!r}: {e}") from e
