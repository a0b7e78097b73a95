"""Quantities as a person reads them. Imports nothing: the journal, the checkpoint plan and the CLI all show bytes,
and the journal sits below the checkpoint package (which imports it), so the one formatter lives below both."""

from __future__ import annotations


def human_bytes(count: float) -> str:
    """Bytes in decimal units, as disks and cloud quotas count them: '512 B', '999.9 KB', then '1.0 MB' (a value
    that would round to 1000.0 of a unit is shown in the next one), at most TB."""
    if abs(count) < 1000:
        return f"{count:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        count /= 1000
        if abs(round(count, 1)) < 1000 or unit == "TB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")
