"""Under torchrun: load checkpoints with transformers' own TP and save them as transformers' distributed checkpoints.

argv: ``SOURCE OUT [SOURCE OUT ...]``. Each pair: ``from_pretrained(SOURCE, distributed_config=DistributedConfig(
tp_size=WORLD))`` then ``save_pretrained(OUT, distributed_checkpoint=True)``, which writes every rank's local shards
with torch DCP's Hugging Face storage writer (``shard-RRRRR-model-00001-of-00001.safetensors``). Several pairs in one
run share the process start-up, the slow part on a two-core machine.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig


def main() -> None:
    args = sys.argv[1:]
    if not args or len(args) % 2:
        raise SystemExit("usage: save_distributed_checkpoint.py SOURCE OUT [SOURCE OUT ...]")
    world = int(os.environ["WORLD_SIZE"])
    for source, out in zip(args[::2], args[1::2], strict=True):
        model = AutoModelForCausalLM.from_pretrained(source, distributed_config=DistributedConfig(tp_size=world))
        model.save_pretrained(out, distributed_checkpoint=True)
        del model
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
