"""Under torchrun: ``load_state_dict(ARTIFACT)`` on this rank, its local tensors written as they are.

argv: ``ARTIFACT OUT``. Writes ``OUT/rankR.safetensors`` (each tensor's local part: ``to_local()`` of a DTensor,
the tensor itself otherwise) and ``OUT/rankR.json`` (each tensor's DTensor placements as text, ``null`` for a plain
tensor). The pytest process compares them with what ``rank_tensors`` gives without a process group.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from reshard.loaders import load_state_dict

artifact, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])
state = load_state_dict(artifact)
local = {n: (t.to_local() if isinstance(t, DTensor) else t).contiguous() for n, t in state.items()}
save_file(local, out / f"rank{rank}.safetensors")
placements = {n: [str(p) for p in t.placements] if isinstance(t, DTensor) else None for n, t in state.items()}
(out / f"rank{rank}.json").write_text(json.dumps(placements))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # gloo's worker thread can abort the interpreter's finalization (see tests/helpers/runtime_worker.py)
