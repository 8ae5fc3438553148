"""The source checkpoint: a local folder or a Hub repo, its config, and where every tensor's bytes are.

Only headers are read here; tensor bytes are streamed later by the writer. Hub repos are fetched with
huggingface_hub's ``snapshot_download`` (its cache, token and ``HF_HUB_OFFLINE`` apply), weights and the files a
model needs to run only.

Nothing in the folder is trusted: weights, index and config must be regular files (a FIFO would hang the reader),
and only an allowlist of config, tokenizer and documentation files is carried into the artifact, never a pickle,
never through a symlink leading out of the folder (or, for a Hub snapshot, out of its repo's ``blobs``). What is
left behind is recorded with the reason, for the manifest and ``reshard inspect``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reshard.manifests.chunks import StoredTensor, contiguous
from reshard.manifests.errors import SourceError, shown
from reshard.manifests.preflight import validate_config
from reshard.manifests.safetensors import HeaderEntry, read_header, weights_dtype
from reshard.source.dtypes import check_config_dtypes, index_dtype, needs_weights_dtype, with_weights_dtype
from reshard.source.oddities import bin_refusal, same_tensor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# What a Hub download fetches besides weights: configs, tokenizer and generation files.
HUB_PATTERNS = [
    "*.safetensors",
    INDEX_NAME,
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "tokenizer*",
    "README*",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
]
# The files from_pretrained and a tokenizer read, besides weights; everything else stays behind.
EXTRA_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "processor_config.json",
        "preprocessor_config.json",
        "README.md",
    }
)
EXTRA_SUFFIXES = (".tiktoken",)
DOC_PREFIXES = ("LICENSE", "NOTICE", "USE_POLICY")
# Loading a pickle runs code; other weight formats are not what the conversion read.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
WEIGHT_SUFFIXES = frozenset({".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".npy", ".tflite", ".ot"})
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$|^[\w.\-]+$")


@dataclass(frozen=True)
class SourceTensor:
    """A checkpoint tensor: its header entry (dtype, shape, absolute byte offset) and the file holding it."""

    name: str
    file: Path
    entry: HeaderEntry

    def stored(self) -> StoredTensor:
        """The tensor as the transforms and readers see it: one contiguous chunk of its file."""
        entry = self.entry
        return StoredTensor(self.name, entry.dtype, entry.shape, contiguous(self.file, entry.offset, entry.nbytes))


@dataclass
class Checkpoint:
    """A resolved checkpoint: root folder, parsed config, tensors by name, and the other files to carry along."""

    root: Path
    config: dict[str, Any]
    tensors: dict[str, SourceTensor]
    weight_files: list[Path]
    extra_files: list[Path]
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    skipped: list[str] = field(default_factory=list)  # "NAME: REASON" of each file not carried along
    index: Path | None = None  # the index read, if the weights are sharded
    # the dtype transformers derives from the weights for dtype="auto" where config.json names none
    weights_dtype: str | None = None


def resolve_source(model: str, revision: str | None = None) -> tuple[Path, str | None, str | None]:
    """Turn MODEL into a local folder: itself if it exists, else a Hub snapshot. Returns (folder, repo_id, commit)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{model}: not a folder (pass the checkpoint folder, not a file)")
        return path, None, None
    if not _REPO_ID.match(model) or model.startswith((".", "/", "~")):
        raise SourceError(f"{model}: no such folder, and not a Hub repo id (owner/name)")
    return _download(model, revision)


def _download(repo_id: str, revision: str | None) -> tuple[Path, str | None, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except RepositoryNotFoundError as exc:
        raise SourceError(f"{repo_id}: repository not found on the Hub (or it is gated and no token is set)") from exc
    except LocalEntryNotFoundError as exc:
        raise SourceError(not_found_anywhere(repo_id)) from exc
    except HfHubHTTPError as exc:
        raise SourceError(f"{repo_id}: download failed ({exc})") from exc
    folder_path = Path(folder)
    # A cache snapshot folder is named after the commit it holds.
    commit = folder_path.name if re.fullmatch(r"[0-9a-f]{40}", folder_path.name) else None
    return folder_path, repo_id, commit


def open_checkpoint(model: str, revision: str | None = None) -> Checkpoint:
    """Resolve MODEL and index every tensor from the safetensors headers, reading the files transformers reads.

    As ``from_pretrained`` does: config.json's ``transformers_weights`` first, else ``model.safetensors`` (even
    beside an index), else the index; every tensor of every file it names, in file-name order. A tensor stored in
    two files is refused unless both hold the same bytes (transformers would silently take the later file's).
    """
    root, repo_id, commit = resolve_source(model, revision)
    config = _read_config(root)
    index_path, files = _weights(root, config, model)
    weight_map, metadata = _read_index(index_path) if index_path is not None else (None, {})
    if weight_map is not None:
        files = sorted({root / f for f in weight_map.values()})

    tensors: dict[str, SourceTensor] = {}
    headers = {}
    for file in files:
        if not _regular_file(file, "a weights file"):
            missing = sorted(n for n, f in (weight_map or {}).items() if root / f == file)
            raise SourceError(
                f"{file}: missing, but {index_path} maps {len(missing)} tensors to it, e.g. {missing[0]!r}"
            )
        headers[file] = header = read_header(file)
        for name, entry in header.tensors.items():
            tensor = SourceTensor(name, file, entry)
            if name in tensors and not same_tensor(tensors[name], tensor):
                raise SourceError(
                    f"{file}: tensor {name!r} is also in {tensors[name].file.name} with other bytes "
                    "(transformers would silently take the later file's); remove the stale copy"
                )
            tensors[name] = tensor  # the later file's, as transformers' loader keeps it
    for name, file_name in (weight_map or {}).items():
        if name not in tensors:
            raise SourceError(f"{root / file_name}: the index names tensor {name!r} but no weights file holds it")

    used = set(files) | ({index_path} if index_path is not None else set())
    extra, skipped = extra_files(root, used)
    if not needs_weights_dtype(config):
        derived = None
    elif index_path is not None and (stated := index_dtype(metadata, str(index_path))) is not None:
        derived = stated
    else:
        derived = weights_dtype({n: e.dtype for n, e in headers[files[0]].tensors.items()}) if files else None
    tensors = dict(sorted(tensors.items()))
    return Checkpoint(root, config, tensors, files, extra, repo_id, revision, commit, skipped, index_path, derived)


def artifact_config(config: dict[str, Any], dtype: str | None) -> dict[str, Any] | None:
    """config.json as the artifact carries it, or ``None`` when the source's is carried unchanged: ``dtype`` recorded
    where the source's names none (the runtime reads the artifact alone), ``transformers_weights`` dropped (the
    weights are the rank files now, and ``save_pretrained`` drops it too)."""
    new = with_weights_dtype(config, dtype) or dict(config)
    new.pop("transformers_weights", None)
    return new if new != config else None


def _weights(root: Path, config: dict[str, Any], model: str) -> tuple[Path | None, list[Path]]:
    """(the index, or ``None``; the single weights file, or none) as ``_get_resolved_checkpoint_files`` picks them
    for a folder: ``transformers_weights``, else ``model.safetensors``, else the index; pickles are refused."""
    explicit = config.get("transformers_weights")
    if explicit is not None:
        origin = root / "config.json"
        if not isinstance(explicit, str) or not explicit.endswith((".safetensors", ".safetensors.index.json")):
            if explicit == "adapter_model.bin":
                raise SourceError(bin_refusal(root, model, config, ["adapter_model.bin"]))
            raise SourceError(
                f"{origin}: transformers_weights must name a .safetensors file or index, got {shown(explicit)}"
            )
        path = root / explicit
        if Path(explicit).is_absolute() or ".." in Path(explicit).parts or not _inside(path, allowed_roots(root)):
            raise SourceError(f"{origin}: transformers_weights {explicit!r} leads outside the checkpoint folder")
        if not _regular_file(path, "the file config.json's transformers_weights names"):
            raise SourceError(f"{path}: missing, but config.json's transformers_weights names it")
        return (path, []) if explicit.endswith(".json") else (None, [path])
    if _regular_file(root / SINGLE_NAME, "a weights file"):
        return None, [root / SINGLE_NAME]  # transformers reads it even when an index is there too
    if _regular_file(root / INDEX_NAME, "the index"):
        return root / INDEX_NAME, []
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickles or not Path(model).expanduser().exists():  # a Hub download fetches no pickles
        raise SourceError(bin_refusal(root, model, config, pickles))
    raise SourceError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are supported)")


def extra_files(root: Path, weights: set[Path]) -> tuple[list[Path], list[str]]:
    """The files to copy into the artifact, and ``"NAME: REASON"`` for every other non-hidden entry of ``root``.

    An allowlist, not a blocklist: a checkpoint folder may hold anything (pickled optimizer state, a symlink to a
    secret), and whatever is copied ends up published with the artifact.
    """
    allowed = allowed_roots(root)
    extra: list[Path] = []
    skipped: list[str] = []
    for path in sorted(root.iterdir()):
        name = path.name
        if name.startswith(".") or path in weights:
            continue
        reason = _skip_reason(path, allowed)
        if reason is None:
            extra.append(path)
        else:
            skipped.append(f"{name}: {reason}")
    return extra, skipped


def _skip_reason(path: Path, allowed: list[Path]) -> str | None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return "pickle (loading it runs code)"
    if suffix in WEIGHT_SUFFIXES:
        return "weights not read by this conversion"
    if path.is_symlink() and not _inside(path, allowed):
        return "symlink leading outside the source folder"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not stat.S_ISREG(mode):
        return "folder" if stat.S_ISDIR(mode) else "not a regular file"
    if not _allowlisted(path.name):
        return "not a config, tokenizer or documentation file"
    return None


def _allowlisted(name: str) -> bool:
    return name in EXTRA_NAMES or name.endswith(EXTRA_SUFFIXES) or name.upper().startswith(DOC_PREFIXES)


def allowed_roots(root: Path) -> list[Path]:
    """Where a symlink in ``root`` may lead: the folder itself and, for a Hub cache snapshot
    (``.../models--ORG--NAME/snapshots/COMMIT``), the repo's ``blobs`` folder its files link to."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    target = path.resolve()
    return any(target == r or r in target.parents for r in roots)


def _regular_file(path: Path, what: str) -> bool:
    """Whether ``path`` exists; raise ``SourceError`` if it is there but not a regular file (a FIFO or device
    would block or stream forever, a folder fails obscurely), before anything opens it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise SourceError(f"{path}: {what} must be a regular file, but this is {kind}")
    return True


def _read_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not _regular_file(path, "config.json"):
        raise SourceError(f"{path}: missing (a checkpoint needs its config.json)")
    if path.is_symlink() and not _inside(path, allowed_roots(root)):
        raise SourceError(f"{path}: a symlink leading outside the source folder (to {path.resolve()})")
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{path}: not a JSON object (a {type(config).__name__})")
    validate_config(config, str(path))
    check_config_dtypes(config, str(path))
    return config


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The index's weight map and its metadata (where transformers may read the model dtype)."""
    try:
        index = json.loads(path.read_bytes())
        weight_map = index["weight_map"]
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from exc
    except (KeyError, TypeError) as exc:
        raise SourceError(f"{path}: has no weight_map") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"{path}: weight_map must map tensor names to file names")
    for name, file_name in weight_map.items():
        if "/" in file_name or "\\" in file_name or file_name in ("", ".", ".."):
            raise SourceError(f"{path}: tensor {name!r} maps to {file_name!r}, outside the checkpoint folder")
    metadata = index.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise SourceError(f"{path}: metadata must be an object, got {shown(metadata)}")
    return weight_map, metadata or {}


def not_found_anywhere(model: str) -> str:
    """Why MODEL could be read neither as a folder nor from the Hub: both, since a mistyped folder name is also a
    valid repo id, with the folders here it may have meant."""
    here = Path.cwd()
    folders = {p.name.lower(): p.name for p in here.iterdir() if p.is_dir() and not p.name.startswith(".")}
    near = [folders[n] for n in difflib.get_close_matches(model.rstrip("/").lower(), list(folders), n=3, cutoff=0.5)]
    hint = f" (did you mean {', '.join(f'./{n}' for n in near)}?)" if near else ""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    hub = "downloads are off (HF_HUB_OFFLINE)" if offline else "the Hub is unreachable (HF_HUB_OFFLINE=1 fails fast)"
    return f"{model}: no folder {str(here / model)!r}{hint}, and as a Hub repo it is not in the local cache and {hub}"


def read_model_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """config.json of MODEL without touching any weight: the local file, or just that file from the Hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return _read_config(path)
    if path.exists() or not _REPO_ID.match(model):
        raise SourceError(f"{model}: no such folder, and not a Hub repo id (owner/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        config_path = hf_hub_download(model, "config.json", revision=revision)
    except LocalEntryNotFoundError as exc:
        raise SourceError(not_found_anywhere(model)) from exc
    except HfHubHTTPError as exc:
        raise SourceError(f"{model}: cannot fetch config.json ({exc})") from exc
    return _read_config(Path(config_path).parent)
