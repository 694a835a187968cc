"""Argument types shared by the benchmark scripts; no torch import, so scripts that set their thread
counts before importing torch (``sweep_models.py``) can use them too."""

from __future__ import annotations

import argparse
import math

__all__ = ["non_negative_float", "non_negative_int", "positive_float", "positive_int"]


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


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (a bandwidth or a speed factor)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number; give e.g. 10 or 0.5")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number of at least 0 (a round-trip time)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is negative or not finite; give 0 or more")
    return value
