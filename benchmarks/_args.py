"""Argument types shared by the benchmark scripts; no torch import, so scripts that set their thread
counts before importing torch (``sweep_models.py``) can use them too."""

from __future__ import annotations

import argparse

__all__ = ["non_negative_int", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count of timed rounds, steps or processes)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count; give 1 or more")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0 (a count where 0 means none, e.g. no images timed)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value
