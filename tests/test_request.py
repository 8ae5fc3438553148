"""A conversion's options are defined once, as ``ConversionRequest`` fields: the CLI's options are made from them,
a worker's command line is written from them and parses back into the same request, and ``reshard.convert`` takes
every one of them."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import pytest

import reshard
from reshard.cli import convert as convert_command
from reshard.cli import main
from reshard.request import FLAG, ConversionRequest


def test_every_option_is_a_request_field_with_its_spelling() -> None:
    fields = [f for f in dataclasses.fields(ConversionRequest) if f.init and f.name != "source"]
    assert [f.name for f in fields if FLAG not in f.metadata] == []
    options = {p.name: p for p in convert_command.params}
    for f in fields:  # a click option under the field's own name, spelled as its Flag says
        assert set(options[f.name].opts) == set(f.metadata[FLAG].decls), f.name


def test_reshard_convert_takes_every_option() -> None:
    parameters = set(inspect.signature(reshard.convert).parameters) - {"group"}
    assert parameters == {f.name for f in dataclasses.fields(ConversionRequest) if f.init}


def test_a_worker_command_line_parses_back_into_the_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option a worker takes set to something other than its default, through ``worker_argv`` and the CLI."""
    plan = {"model.layers.*.mlp.down_proj": "rowwise"}
    request = ConversionRequest(
        "org/model",
        tmp_path / "out",
        4,
        plan,
        "v1",
        replicate_kv=True,
        ep=4,
        overwrite=True,
        progress=True,
        workers=3,
        durable=False,
        dtype="bfloat16",
        pp=2,
        transformers="5.23.0",
        allow_missing=True,
    )
    taken = {f.name for f in dataclasses.fields(request) if FLAG in f.metadata and f.metadata[FLAG].to_workers}
    defaults = ConversionRequest("m", tmp_path, 1)
    assert all(getattr(request, name) != getattr(defaults, name) for name in taken - {"out"})  # none left at default
    seen: list[Any] = []
    monkeypatch.setattr("reshard.commands.convert.convert_part", lambda *args: seen.append(args))
    main(request.worker_argv(1, 3))
    ((parsed, index, size),) = seen
    assert (index, size) == (1, 3) and json.loads(parsed.plan) == plan  # an inline plan travels as its JSON
    # what workers do not take: they run quiet, once each, into the staging folder the parent made
    assert parsed == dataclasses.replace(request, plan=parsed.plan, overwrite=False, progress=False, workers=1)
