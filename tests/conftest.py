"""Shared test settings: no test may reach the network (there is none here; fail fast instead of retrying)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
