"""Seeded fuzz of an artifact's manifest and rank-file headers: ``python scripts/fuzz.py --iterations 5000``.

Each mutant is one of: 1-3 random byte edits of ``manifest.json``; a field edit of its JSON (a value's type
swapped, a number moved by one, two list items swapped, a key dropped); 1-3 byte edits of a rank file's header;
a forged record (a plan rule, a tensor's style, key renames, a KV-replication, row-block or interleave record, plan
overrides or an expert plan) in a manifest re-sealed with its digest recomputed, as anyone who can write the folder
can. The mutant is checked in-process with ``reshard verify`` (``reshard.cli.main``). The outcome must be exit 0
only when the parsed manifest is unchanged (and the rank file too) or, for a forged record, when the mutant is
provably harmless (it consolidates to the original's tensors, and everything the runtime reads of the manifest
is the original's), else the documented exit code of a ReshardError; anything else (another exception, a hang)
is a finding. Prints the count of each outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXIT_CODES = {0, 6, 7, 12}  # intact; ManifestError; IntegrityError; FileFormatError (a rank file's header)
TIMEOUT_SECONDS = 10


def byte_edits(raw: bytes, rng: random.Random, start: int = 0, stop: int | None = None) -> bytes:
    """1-3 random byte replacements, insertions or deletions in ``raw[start:stop]``."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(start, stop if stop is not None else len(data))
        action = rng.choice(("replace", "insert", "delete"))
        if action == "replace":
            data[at] = rng.randrange(256)
        elif action == "insert":
            data.insert(at, rng.choice(b'0123456789",:[]{}-.\\ aeflnrstu\xff\x80'))
        else:
            del data[at]
    return bytes(data)


def field_edit(data: Any, rng: random.Random) -> Any:
    """One structural edit of a random node of the parsed JSON: a type swap, a number +-1, a swap of two list
    items, or a dropped key."""
    nodes: list[tuple[Any, Any]] = []  # (container, key) of every value

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in items:
            nodes.append((node, key))
            walk(value)

    walk(data)
    container, key = rng.choice(nodes)
    value = container[key]
    action = rng.choice(("type", "number", "swap", "drop"))
    if action == "number" and isinstance(value, int) and not isinstance(value, bool):
        container[key] = value + rng.choice((-1, 1))
    elif action == "swap" and isinstance(value, list) and len(value) > 1:
        i, j = rng.sample(range(len(value)), 2)
        value[i], value[j] = value[j], value[i]
    elif action == "drop" and isinstance(container, dict):
        del container[key]
    else:
        container[key] = rng.choice([None, True, 0, -1, 10**12, "0", ".", [], {}, [value], 1.5])
    return data


STYLES = ("colwise", "rowwise", "colwise_gather_output", "embedding_rowwise", "replicated_with_grad_allreduce", None)
RENAMES = (
    ["^model\\.layers\\.1\\.", "model.layers.0."],
    ["^lm_head\\.", "output."],
    ["^embed_out\\.", "lm_head."],
    ["^model\\.language_model\\.", "model."],
)


def forge_record(data: dict[str, Any], rng: random.Random) -> str:
    """Replace or add one record of the parsed manifest ``data`` with a plausible lie; return its name."""
    names = [t["name"] for t in data["tensors"]]
    options = data.setdefault("options", {})
    record = rng.choice(
        ("plan", "style", "key_renames", "replicate_kv", "chunked", "concatenated", "interleaved", "overrides", "ep")
    )
    if record == "plan" and data["plan"]:
        data["plan"][rng.choice(sorted(data["plan"]))] = rng.choice([s for s in STYLES if s])
    elif record == "style":
        rng.choice(data["tensors"])["style"] = rng.choice(STYLES)
    elif record == "key_renames":
        options["key_renames"] = rng.sample(RENAMES, rng.randint(1, 2))
    elif record == "replicate_kv":
        original = rng.choice((1, 2))
        options["replicate_kv"] = {
            "original_kv_heads": original,
            "replicated_kv_heads": original * rng.choice((1, 2, 4)),
            "head_dim": rng.choice((8, 16, 32)),
        }
    elif record in ("chunked", "concatenated"):
        parts = rng.sample(names, 2)
        target = rng.choice(names) if record == "concatenated" else parts[0] + ".joined"
        options[record] = {target: [[name, rng.choice((16, 32, 96))] for name in parts]}
    elif record == "interleaved":
        options["interleaved"] = {rng.choice(names): {"source": "w13.weight", "dim": 0, "blocks": [48, 48]}}
    elif record == "overrides":
        data["plan_overrides"] = {rng.choice(sorted(data["plan"]) or ["lm_head"]): rng.choice(STYLES[:3])}
    else:
        data["ep_plan"] = {"model.layers.*.mlp": "grouped_gemm"}
        data["expert_mesh"] = {"ep": data["mesh"]["tp"]}
    return record


def mutate(artifact: Path, rng: random.Random) -> str:
    """Mutate one file of ``artifact`` in place; return the kind of mutation."""
    from reshard.manifests.manifest import DIGEST_FIELD, manifest_digest

    manifest = artifact / "manifest.json"
    kind = rng.choice(("manifest bytes", "manifest field", "rank header", "forged record"))
    if kind == "forged record":
        data = json.loads(manifest.read_text())
        kind = f"forged {forge_record(data, rng)}"
        data[DIGEST_FIELD] = manifest_digest(data)
        manifest.write_text(json.dumps(data))
    elif kind == "manifest bytes":
        manifest.write_bytes(byte_edits(manifest.read_bytes(), rng))
    elif kind == "manifest field":
        manifest.write_text(json.dumps(field_edit(json.loads(manifest.read_text()), rng)))
    else:
        rank_file = rng.choice(sorted(artifact.glob("rank-*.safetensors")))
        raw = rank_file.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        rank_file.write_bytes(byte_edits(raw, rng, 0, 8 + length))
    return kind


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Raise ``TimeoutError`` if the block runs longer than ``seconds`` (a hang is a finding)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"no outcome after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(artifact: Path) -> int:
    """``reshard verify -q ARTIFACT`` in-process: its exit code (0 when it returns)."""
    from reshard.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(["verify", "-q", str(artifact)])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
    return 0


def unchanged(original: Path, mutant: Path) -> bool:
    """Whether the mutant's files parse to the original's content (the manifest as JSON, rank files as bytes)."""
    for path in original.iterdir():
        other = mutant / path.name
        if path.name == "manifest.json":
            try:
                if json.loads(other.read_bytes()) != json.loads(path.read_bytes()):
                    return False
            except ValueError:
                return False
        elif path.read_bytes() != other.read_bytes():
            return False
    return True


def harmless(original: Path, mutant: Path, work: Path) -> bool:
    """A forged record verify accepted is harmless only if the runtime reads the same (plan, expert plan, tensors'
    styles, placements and shapes, the records it acts on) and consolidation gives the same tensors, byte for byte.
    Overrides whose merge is the recorded plan are a custom plan the user could have given (``--plan`` with the
    model's own rules): the same plan, the same weights."""
    from reshard.commands.consolidate import consolidate
    from reshard.manifests import read_manifest
    from reshard.manifests.safetensors import read_header

    def runtime_view(root: Path) -> Any:
        m = read_manifest(root)
        tensors = [(t.name, t.dtype, t.shape, t.style, t.placement) for t in m.tensors]
        return m.plan, m.ep_plan, tensors, m.options.replicate_kv, m.options.interleaved

    def tensors(root: Path) -> dict[str, bytes]:
        out = {}
        for path in root.glob("*.safetensors"):
            raw = path.read_bytes()
            for name, entry in read_header(path).tensors.items():
                out[name] = raw[entry.offset : entry.offset + entry.nbytes]
        return out

    if runtime_view(original) != runtime_view(mutant):
        return False
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            consolidate(mutant, work / "mutant-checkpoint", overwrite=True, progress=False)
        except Exception:  # refused: nothing was written, which is harmless
            return True
        consolidate(original, work / "original-checkpoint", overwrite=True, progress=False)
    return tensors(work / "mutant-checkpoint") == tensors(work / "original-checkpoint")


def run(original: Path, iterations: int, seed: int, work: Path) -> Counter[str]:
    """Mutate a copy of ``original`` ``iterations`` times; count outcomes as ``kind: exit N`` or ``FINDING: ...``."""
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    for index in range(iterations):
        mutant = work / f"m{index}"
        shutil.copytree(original, mutant)
        kind = mutate(mutant, rng)
        try:
            with deadline(TIMEOUT_SECONDS):
                code = check(mutant)
        except Exception as exc:  # anything that is not SystemExit from a ReshardError
            outcomes[f"FINDING {kind}: {type(exc).__name__}: {exc}"[:200]] += 1
        else:
            if code not in EXIT_CODES:
                outcomes[f"FINDING {kind}: exit {code}"] += 1
            elif code == 0 and not unchanged(original, mutant) and not harmless(original, mutant, work):
                outcomes[f"FINDING {kind}: accepted a changed artifact ({mutant})"] += 1
            else:
                outcomes[f"{kind}: exit {code}"] += 1
        if not any(key.startswith("FINDING") and str(mutant) in key for key in outcomes):
            shutil.rmtree(mutant)
    return outcomes


def build_artifact(root: Path) -> Path:
    """The llama tp=2 artifact of the tests."""
    import reshard

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.helpers.checkpoints import make_checkpoint

    reshard.convert(make_checkpoint("llama", root / "src"), root / "art", tp=2, progress=False)
    return root / "art"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifact", type=Path, help="an artifact to mutate (default: a tiny llama at tp=2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        original = args.artifact or build_artifact(Path(tmp))
        outcomes = run(original, args.iterations, args.seed, Path(tmp) / "mutants")
    for outcome, count in sorted(outcomes.items()):
        print(f"{count:6d}  {outcome}")
    return 1 if any(key.startswith("FINDING") for key in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
