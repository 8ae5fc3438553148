"""Under torchrun: transformers' own distributed checkpoint of a checkpoint, for ``coldstart.py --dcp``.

    torchrun --nproc-per-node N benchmarks/dcp_save_worker.py SOURCE OUT

``from_pretrained(SOURCE, distributed_config=DistributedConfig(tp_size=N))`` then
``save_pretrained(OUT, distributed_checkpoint=True)``: every rank writes its local shards with torch DCP's Hugging Face
storage writer (``shard-RRRRR-model-00001-of-00001.safetensors``), rank 0 the config.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist
from transformers import AutoModelForCausalLM, DistributedConfig


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: dcp_save_worker.py SOURCE OUT")
    source, out = sys.argv[1:]
    tp = DistributedConfig(tp_size=int(os.environ["WORLD_SIZE"]))
    model = AutoModelForCausalLM.from_pretrained(source, distributed_config=tp)
    model.save_pretrained(out, distributed_checkpoint=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
