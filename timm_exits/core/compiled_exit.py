"""`torch.compile` of the exit branches: the options each exit compiles with, kept with the branch.

`EarlyExitModel.compile_exits` stores a `CompiledExit` on every `ExitBranch`; the branch compiles its own
`forward` at first use, so copies and pickles of a model never share a compiled function.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["CompiledExit", "compile_options"]


class CompiledExit:
    """`torch.compile` options of one exit and the compiled `ExitBranch.forward`, built at first use.

    Copies and pickles of the branch keep the options and compile their own function: the compiled
    function is bound to the branch it was built from.
    """

    __slots__ = ("options", "fn")

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.fn: Any = None

    def __deepcopy__(self, memo: dict) -> CompiledExit:
        return CompiledExit(dict(self.options))

    def __reduce__(self) -> tuple:
        return (CompiledExit, (dict(self.options),))


def compile_options(mode: str | None, dynamic: bool | None, fullgraph: bool, backend: str) -> dict[str, Any]:
    """Keyword arguments of `torch.compile` for one exit. Every exit compiles the same function
    (`ExitBranch.forward`); where torch can, each exit keeps its own recompile count
    (`isolate_recompiles`), so that many exits do not exhaust one shared recompile limit."""
    options: dict[str, Any] = {"mode": mode, "dynamic": dynamic, "fullgraph": fullgraph, "backend": backend}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        options["isolate_recompiles"] = True
    return options
