"""Cold start: ``load_model`` / ``load_state_dict`` return zero-copy views of the rank file, paged in on first use by
default; with ``populate=True`` every page is resident on return (mapped into the process, so the first forward takes
no page faults) and the thread that made them resident is gone."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pytest
import torch

from reshard.loaders import load_state_dict
from reshard.loaders.rank_file import map_rank_file
from reshard.manifests import read_manifest
from reshard.manifests.safetensors import read_header
from tests.helpers.memory import mapped_file

PAGE = 4096


def mapping_rss(address: int) -> tuple[int, int]:
    """(size, resident bytes) of the mapping of this process that holds ``address``, from ``/proc/self/smaps``."""
    found = False
    size = 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            start, stop = (int(part, 16) for part in fields[0].split("-"))
            found, size = start <= address < stop, stop - start
        elif found and fields[0] == "Rss:":
            return size, int(fields[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def rank_file(artifact: Path) -> Path:
    return (artifact / read_manifest(artifact).rank_file(0).path).resolve()


def populate_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("reshard")]


def assert_resident_views(tensors: dict[str, torch.Tensor], path: Path) -> None:
    for name, tensor in tensors.items():
        if tensor.numel():
            assert mapped_file(tensor) == path, name  # zero-copy: a view of the rank file's mapping
    first = next(t for t in tensors.values() if t.numel())
    size, rss = mapping_rss(first.untyped_storage().data_ptr())
    header_pages = read_header(path).data_start // PAGE * PAGE  # only the data section is made resident
    assert rss >= size - header_pages, (size, rss)


@pytest.fixture(autouse=True)
def no_thread_left() -> None:
    yield
    assert not populate_threads()


def test_load_state_dict_returns_resident_views(tiny) -> None:
    artifact = tiny.artifact("llama_tied", tp=1)
    state = load_state_dict(artifact, populate=True)
    assert not populate_threads()
    assert_resident_views(state, rank_file(artifact))


@pytest.mark.parametrize("how", ["map_rank_file", "load_state_dict"])
def test_by_default_pages_come_in_on_first_use(tiny, how: str) -> None:
    """The default, and the control: a fresh mapping has (almost) nothing resident, so the check above means it."""
    artifact = tiny.artifact("llama_tied", tp=1)
    if how == "map_rank_file":
        local = map_rank_file(artifact, read_manifest(artifact), 0, device=torch.device("cpu"), verify=False)
    else:
        local = load_state_dict(artifact)
        assert all(mapped_file(t) == rank_file(artifact) for t in local.values() if t.numel())  # still views
    first = next(t for t in local.values() if t.numel())
    size, rss = mapping_rss(first.untyped_storage().data_ptr())
    assert size > 4 * PAGE and rss < size / 2, (size, rss)


def test_load_model_returns_resident_views_and_no_thread(tiny) -> None:
    from reshard.loaders import load_model

    artifact = tiny.artifact("llama_tied", tp=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(artifact, populate=True)
    assert not populate_threads()
    params = {name: p.data for name, p in model.named_parameters()}
    assert_resident_views(params, rank_file(artifact))
