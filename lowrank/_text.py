"""Plain-text tables for reports: aligned columns and sizes written `a×b×c`."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def sizes_text(value: object) -> str:
    """A rank pair or shape (a list or tuple) as `a×b`, anything else by `str`."""
    return "×".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def aligned(rows: Sequence[Sequence[str]], left: Collection[int] = (0,)) -> list[str]:
    """`rows` of cells as lines of columns two spaces apart, each as wide as its widest
    cell: the columns in `left` left-aligned, the others right; no trailing spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells: Iterable[str]) -> str:
        padded = (
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return [line(row) for row in rows]
