"""Progress bars and byte sizes as people read them, for both halves. A bar costs nothing when turned off: tqdm
(and the asyncio it pulls in, a noticeable part of start-up) is only imported when a bar is shown."""

from __future__ import annotations

from typing import Any


class _NoBar:
    """What a disabled bar needs to answer."""

    def update(self, n: float = 1) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def progress_bar(*, total: float, desc: str, unit: str = "B", enabled: bool = True) -> Any:
    """A tqdm bar (bytes scaled to kB/MB/GB when ``unit`` is ``"B"``), or a no-op stand-in when not ``enabled``."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc)


def format_size(size: float) -> str:
    """Bytes in decimal units, as the Hub shows them: ``512 B``, ``1.5 MB``, ``3.4 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
