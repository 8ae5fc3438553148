"""Shared test helpers: tiny checkpoints and a bounded torchrun launcher."""

from .checkpoints import FAMILIES, KINDS, make_checkpoint
from .distributed import free_port, run_torchrun

__all__ = ["FAMILIES", "KINDS", "free_port", "make_checkpoint", "run_torchrun"]
