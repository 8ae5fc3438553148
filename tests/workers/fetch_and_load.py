"""Under torchrun: load a published artifact straight from its URI, compare with the local artifact.

argv: ``URI LOCAL_ARTIFACT CACHE_ROOT OUT``. Each rank calls ``load_state_dict(URI)``, which fetches this rank's
share into ``$RESHARD_CACHE`` = ``CACHE_ROOT/rankR`` (as on its own node), with ``AWS_SDK_UA_APP_ID=rankR`` so the
S3 server can tell the ranks' requests apart; then ``load_state_dict`` of the local artifact, and writes
``OUT/rankR.json``: the files it got, whether every local tensor is equal. The pytest process asserts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


rank = int(os.environ["RANK"])
os.environ["AWS_SDK_UA_APP_ID"] = f"rank{rank}"
uri, artifact, cache, out = sys.argv[1:5]
os.environ["RESHARD_CACHE"] = str(Path(cache) / f"rank{rank}")

from reshard.loaders import load_state_dict  # noqa: E402
from reshard.loaders.fetch import fetch_artifact  # noqa: E402

fetched = load_state_dict(uri)  # the URI itself: the loader fetches the manifest, small files and this rank's file
folder = fetch_artifact(uri, rank, progress=False)  # where that went (cached now)
expected = load_state_dict(artifact)


equal = fetched.keys() == expected.keys() and all(torch.equal(local(t), local(expected[n])) for n, t in fetched.items())
files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
Path(out, f"rank{rank}.json").write_text(json.dumps({"files": files, "equal": equal, "folder": str(folder)}))
dist.destroy_process_group()
