"""Hugging Face Hub: publish and download multi-exit models as safetensors, with generated model cards.

A saved multi-exit model is a folder (or Hub repo) that is at the same time a normal timm repo:

    config.json          timm's own config (architecture, num_classes, model_args, pretrained_cfg), plus the
                         exit configuration (`ExitConfig.to_dict()`) under the top-level key "timm_exits", with
                         the SHA-256 of both weight files under "timm_exits" -> "files", the parameters' floating
                         dtype under "dtype" (from_pretrained casts to it), whether the costs were measured under
                         "costs_measured" (reset_classifier measures them again) and the backbone's pretrained_cfg
                         "hf_hub_id" under "upstream_hf_hub_id" (the card's base model)
    model.safetensors    the backbone's weights, as timm's `save_for_hf(..., safe_serialization=True)` writes them
    exits.safetensors    exit heads, gates, the added final head (if any) and the `exit_costs` buffer, keyed as
                         in `EarlyExitModel.state_dict()`; its header metadata repeats the format version,
                         the architecture and the exit names, and records the SHA-256 of the model.safetensors
                         it was saved with ("backbone_sha256")
    README.md            a model card generated from the templates in `timm_exits/hub/hub_cards/`
    report.json          the training report the card's numbers come from (only when one was given)

`timm.create_model("hf-hub:org/name", pretrained=True)` and `"local-dir:/path"` load the backbone from it as
they would any timm repo; `from_pretrained` rebuilds the whole multi-exit model and `load_exits` attaches the
saved exits to a backbone already in memory. Only safetensors are written or read, never pickle, and loading
is strict: every mismatch raises `ExitCheckpointError` naming the file and the key.

Integrity: loading checks each file it reads against the SHA-256 recorded in config.json, so one changed byte
anywhere in a weight file (header or tensor data) raises, naming the file and both hashes; and it checks that
exits.safetensors was saved together with this folder's model.safetensors, so exits copied over from another
trained model of the same architecture and exits are refused, naming both files. The hashes guard against
damaged downloads and mixed-up files, not against deliberate edits (whoever edits a file can edit config.json).
Folders of format version 1 (written before the hashes were recorded) still load, with a warning that they cannot
be verified; saving the loaded model again records the hashes.

Modules: `files` (file names, strict safetensors reading, SHA-256 records), `save` (`save_pretrained`,
`push_to_hub`; imports no model code, so the model's own save methods can call it), `load` (`from_pretrained`,
`load_exits`), `card` (model cards) and `runs` (`push_run`: publish a training run).

The card templates are `string.Template` files in `timm_exits/hub/hub_cards/` (package data): `model_card.md`
(the card: $front_matter, $title, $architecture, $exit_list, $final_note, $head, $gate, $policy, $predict_note,
$trained, $source, $timm_source, $results, $training), `results.md` ($headline, $exit_table, $policies, $speed) when a
report is given and `no_results.md` when not. Every number on a card comes from the report.
"""

from .card import render_model_card
from .files import CARD_NAME, CONFIG_KEY, CONFIG_NAME, EXITS_NAME, REPORT_NAME, WEIGHTS_NAME, ExitCheckpointError
from .load import from_pretrained, load_exits
from .runs import push_run
from .save import push_to_hub, save_pretrained

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "EXITS_NAME",
    "CARD_NAME",
    "REPORT_NAME",
    "CONFIG_KEY",
    "ExitCheckpointError",
    "save_pretrained",
    "push_to_hub",
    "push_run",
    "from_pretrained",
    "load_exits",
    "render_model_card",
]
