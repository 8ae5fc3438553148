"""The whole pipeline on a bundled example: make a checkpoint, check, reshard, verify, load under torchrun.

    python examples/demo.py            # (or `make demo`) everything under ./demo-out

1. writes a small Llama checkpoint with random weights (transformers' save_pretrained, sharded + index, like the Hub);
2. ``reshard check`` says which tp sizes work, ``reshard --tp 2`` converts, ``reshard verify`` re-hashes;
3. ``torchrun --nproc-per-node 2 examples/demo_worker.py`` loads the artifact with ``reshard.loaders.load_model``
   and the checkpoint with transformers' ``from_pretrained(distributed_config=DistributedConfig(tp_size=2))`` and
   compares them;
4. serves the artifact with ``examples/serve_tp.py`` (its word-level tokenizer travels with the artifact);
5. prints a verdict: PASS when placements, logits and generated tokens are identical and serving ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("RESHARD_DEMO_OUT", ROOT / "demo-out"))


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def make_checkpoint(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8003,  # uneven over 2 ranks, like many real vocabularies
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="20MB")
    save_word_tokenizer(path, config.vocab_size)


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer (``<unk> <s> </s> w3 w4 ...``), so that the artifact serves offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    checkpoint, artifact = OUT / "tiny-llama", OUT / "tiny-llama-tp2"
    print(f"== 1. a checkpoint with random weights: {checkpoint}")
    make_checkpoint(checkpoint)
    reshard = [sys.executable, "-m", "reshard"]
    print("== 2. check, convert, verify, inspect")
    subprocess.run([*reshard, "check", "--tp", "2", "--tp", "3", str(checkpoint)])  # tp=3 is refused, by design
    run(*reshard, "--tp", "2", str(checkpoint), "-o", str(artifact))
    run(*reshard, "verify", str(artifact))
    inspect = subprocess.run([*reshard, "inspect", str(artifact)], capture_output=True, text=True, check=True)
    print("$ reshard inspect", artifact, "(first lines)")
    print("\n".join(inspect.stdout.splitlines()[:28]))
    print("== 3. load under torchrun (2 ranks, gloo) and compare with transformers' own TP load")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = ROOT / "examples" / "demo_worker.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    result = subprocess.run([*torchrun, str(worker), str(artifact), str(checkpoint)], env=env)
    print("== 4. serve it as a user would: examples/serve_tp.py (tokenizer carried into the artifact)")
    serve = [*torchrun, str(ROOT / "examples" / "serve_tp.py"), str(artifact), "--prompt", "w5 w6 w7"]
    served = subprocess.run([*serve, "--max-new-tokens", "8"], env=env)
    passed = result.returncode == 0 and served.returncode == 0
    print("== 5. verdict:", "PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
