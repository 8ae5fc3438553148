"""The copy engine: one writer thread's share of the rank files, every tensor's bytes streamed into them.

Each tensor is seen as ``[outer, length, row]`` around its placement dim (``Geometry``). Source bytes are written
straight from the mapped source (no copy into this process) and hashed while still in the CPU cache; a rowwise
tensor's columns are scattered by the kernel (one ``preadv`` per block of rows, its buffer list planned once per
shape) into a fixed gather buffer; anything else is read into a fixed buffer. Memory stays bounded by the buffers,
whatever the model's size. A tensor stored in another dtype than the source's (``--dtype``) is read through a
``CastReader`` that converts each run; tensors that keep their dtype pay nothing for it. Knows nothing of plans or
styles: it executes the ``TensorLayout`` values it is given, asking a ``ChunkReader`` where each run of bytes lies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reshard.manifests.layout import Geometry, TensorLayout
from reshard.write.os_calls import IOV_MAX
from reshard.write.reader import CastReader, ChunkReader, ColumnSpan

if TYPE_CHECKING:
    from reshard.write.rank_files import RankSink

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _ScatterPlan:
    """How ``preadv`` calls over whole outer blocks put each rank's columns in its own region of the gather buffer:
    ``reads[k]`` are source k's ``(offset in its span, buffers)`` calls; ``regions`` each rank's ``(start, stop)``.
    Columns of ranks another thread writes land in a scratch buffer, overwritten at will."""

    reads: list[list[tuple[int, list[memoryview], int]]]
    regions: dict[int, tuple[int, int]]


class Streamer:
    """Copies every tensor's bytes for a group of ranks: views of the mapped source written as they are, rowwise
    columns scattered by the kernel into a fixed gather buffer, other sources read into a fixed buffer."""

    def __init__(
        self, sinks: dict[int, RankSink], buffer_bytes: int, on_bytes: Callable[[int], None], stop: threading.Event
    ) -> None:
        self.sinks, self.on_bytes, self.stop = sinks, on_bytes, stop
        self.size = buffer_bytes
        self._buffers: dict[str, bytearray] = {}  # allocated when first needed
        self._plans: dict[tuple[object, ...], _ScatterPlan] = {}  # the same shapes recur in every layer

    def _buffer(self, purpose: str, size: int | None = None) -> bytearray:
        """``"read"``: bytes of a source that lends no span; ``"gather"``: the ranks' columns of a block;
        ``"scratch"``: other ranks' columns; ``"cast"``: a run in the source's dtype, before conversion. Grown,
        never shrunk (plans keep views of the old ones)."""
        size = size or self.size
        if len(self._buffers.get(purpose, b"")) < size:
            self._buffers[purpose] = bytearray(size)
        return self._buffers[purpose]

    def copy_all(self, layouts: list[TensorLayout], readers: dict[str, ChunkReader]) -> None:
        for layout in layouts:
            if self.stop.is_set():
                return
            self.copy(readers[layout.name], layout)

    def copy(self, reader: ChunkReader, layout: TensorLayout) -> None:
        """View the tensor as ``[outer, length, row]`` around its placement dim and cut each rank's ranges."""
        for sink in self.sinks.values():
            sink.begin_tensor()
        g = Geometry.of(layout)
        if not layout.shape:  # a 0-dim tensor: its one element is one row, held whole by every rank
            layout = dataclasses.replace(layout, ranges=tuple(((0, 1),) for _ in layout.ranges))
        if reader.tensor.dtype != layout.dtype:  # reshard --dtype: every run read and converted, never a view
            reader = CastReader(reader.files, reader.tensor, g, layout.dtype, lambda n: self._buffer("cast", n))
        block = g.length * g.row
        if block and g.outer:
            if block <= self.size and g.outer > 1:
                self._whole_blocks(reader, layout, g)
            else:
                self._row_runs(reader, layout, g)
        for sink in self.sinks.values():
            sink.end_tensor(layout.name)

    @contextlib.contextmanager
    def _source(
        self, reader: ChunkReader, first: int, count: int, lo: int, hi: int, nbytes: int
    ) -> Iterator[memoryview]:
        """The global bytes of rows ``[lo, hi)`` of outer indices ``[first, first + count)``: a view of the mapped
        source where the reader has them contiguous, else read into this streamer's buffer."""
        span = reader.span(first, count, lo, hi)
        if span is not None:
            with span.mapped() as view:
                yield view
            return
        buffer = self._buffer("read") if nbytes <= self.size else bytearray(nbytes)
        with memoryview(buffer)[:nbytes] as view:
            reader.read(first, count, lo, hi, view)
            yield view

    def _row_runs(self, reader: ChunkReader, layout: TensorLayout, g: Geometry) -> None:
        """Each rank's rows, run by run inside each outer index: contiguous in the source, nothing is gathered."""
        rows_per_read = max(1, self.size // g.row)
        for index in range(g.outer):
            for rank, sink in self.sinks.items():
                for start, stop in layout.ranges[rank]:
                    for first in range(start, stop, rows_per_read):
                        last = min(first + rows_per_read, stop)
                        cuts = [first, *reader.breaks(index, first, last), last]  # a span on each side of a break
                        for lo, hi in itertools.pairwise(cuts):
                            with self._source(reader, index, 1, lo, hi, (hi - lo) * g.row) as view:
                                sink.write(view)
                        self.on_bytes((last - first) * g.row)

    def _whole_blocks(self, reader: ChunkReader, layout: TensorLayout, g: Geometry) -> None:
        """Several whole outer indices at once, each rank's ranges taken from them (a rowwise weight's columns)."""
        block = g.length * g.row
        per_read = max(1, self.size // block)
        held = {rank: layout.ranges[rank] for rank in self.sinks if any(b > a for a, b in layout.ranges[rank])}
        contiguous = all(len(ranges) == 1 for ranges in held.values())
        whole = all(ranges == ((0, g.length),) for ranges in held.values())
        for first in range(0, g.outer, per_read):
            count = min(per_read, g.outer - first)
            spans = None if whole or (count == 1 and contiguous) else reader.column_spans(first, count)
            if spans:
                self._scatter(spans, held, g, count)  # the kernel gathers: no per-row Python work, GIL released
                continue
            with self._source(reader, first, count, 0, g.length, count * block) as view:
                for rank, ranges in held.items():
                    if whole:  # the whole tensor (replicated): the block as it is
                        self._write(rank, view)
                    elif count == 1 and contiguous:  # one run of the block: no gather needed
                        ((start, stop),) = ranges
                        self._write(rank, view[start * g.row : stop * g.row])
                    else:
                        self._write(rank, self._gather(view, ranges, g, count))

    def _write(self, rank: int, data: memoryview) -> None:
        self.sinks[rank].write(data)
        self.on_bytes(len(data))

    def _gather(self, view: memoryview, ranges: tuple[tuple[int, int], ...], g: Geometry, count: int) -> memoryview:
        """One rank's ranges of ``count`` whole blocks, copied one after another into the gather buffer."""
        gathered, position, block = memoryview(self._buffer("gather")), 0, g.length * g.row
        for index in range(count):
            base = index * block
            for start, stop in ranges:
                size = (stop - start) * g.row
                gathered[position : position + size] = view[base + start * g.row : base + stop * g.row]
                position += size
        return gathered[:position]

    def _scatter(self, spans: list[ColumnSpan], held: dict[int, Ranges], g: Geometry, count: int) -> None:
        """Read ``count`` whole blocks with ``preadv`` straight into each rank's region, then write the regions."""
        key = (g, count, tuple(held.items()), tuple(columns for _, columns in spans))
        if key not in self._plans:
            self._plans[key] = self._scatter_plan(held, g, count, [columns for _, columns in spans])
        plan = self._plans[key]
        for (span, _), reads in zip(spans, plan.reads, strict=True):
            span.scatter(reads)
        gathered = memoryview(self._buffer("gather"))
        for rank, (start, stop) in plan.regions.items():
            self._write(rank, gathered[start:stop])

    def _scatter_plan(self, held: dict[int, Ranges], g: Geometry, count: int, sources: list[Ranges]) -> _ScatterPlan:
        """Lay each rank's columns of ``count`` blocks row after row in its region. Each source holds, row after
        row, the columns ``sources[k]`` (a checkpoint: all of them; an old rank file: that rank's); its bytes that
        no rank here holds (merged across rows) go to the scratch buffer."""
        regions, widths, position = {}, {}, 0
        for rank, ranges in held.items():
            widths[rank] = sum(stop - start for start, stop in ranges) * g.row
            regions[rank] = (position, position + count * widths[rank])
            position += count * widths[rank]

        def local(rank: int, column: int) -> int:
            """Where global ``column`` lies in one row of ``rank``'s piece, in bytes."""
            before = 0
            for start, stop in held[rank]:
                if start <= column < stop:
                    return before + (column - start) * g.row
                before += (stop - start) * g.row
            raise AssertionError(column)

        plans = []
        for columns in sources:
            items: list[tuple[int, int] | int] = []  # a (start, stop) of the gather buffer, or bytes to skip
            skip = 0
            for index in range(count):
                for a, b in columns:
                    cursor = a
                    overlaps = sorted(
                        (max(a, start), min(b, stop), rank)
                        for rank, ranges in held.items()
                        for start, stop in ranges
                        if max(a, start) < min(b, stop)
                    )
                    for lo, hi, rank in overlaps:
                        skip += (lo - cursor) * g.row
                        if skip:
                            items.append(skip)
                            skip = 0
                        at = regions[rank][0] + index * widths[rank] + local(rank, lo)
                        items.append((at, at + (hi - lo) * g.row))
                        cursor = hi
                    skip += (b - cursor) * g.row
            if skip:
                items.append(skip)
            plans.append(self._preadv_calls(items))
        return _ScatterPlan(plans, regions)

    def _preadv_calls(self, items: list[tuple[int, int] | int]) -> list[tuple[int, list[memoryview], int]]:
        """``(offset, buffers, bytes)`` calls of at most ``IOV_MAX`` buffers for items read one after another."""
        gathered = memoryview(self._buffer("gather"))
        scratch = memoryview(self._buffer("scratch", max([i for i in items if isinstance(i, int)], default=1)))
        buffers = [scratch[:i] if isinstance(i, int) else gathered[i[0] : i[1]] for i in items]
        calls, offset = [], 0
        for index in range(0, len(buffers), IOV_MAX):
            chunk = buffers[index : index + IOV_MAX]
            nbytes = sum(len(b) for b in chunk)
            calls.append((offset, chunk, nbytes))
            offset += nbytes
        return calls
