"""Fixed-size blocking of a matrix for the Kronecker-factored optimizers (Shampoo, SOAP).

A ``rows × cols`` matrix cut into blocks of at most ``size × size`` has at most four shapes of
block: full blocks, the right edge, the bottom edge and the corner. Each shape class is a
rectangular *region* tiled by equal blocks, so its blocks are stacked into one
``(n, block_rows, block_cols)`` tensor and every per-block operation (Gram updates, eigh,
projections, QR) runs batched — one call per class instead of one per block. Without a
block size the whole matrix is one region holding one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Region:
    """A rectangle of the matrix tiled by equal ``br × bc`` blocks."""

    rows: slice
    cols: slice
    br: int
    bc: int

    @property
    def count(self) -> int:
        return ((self.rows.stop - self.rows.start) // self.br) * (
            (self.cols.stop - self.cols.start) // self.bc
        )


def block_size_or_none(block_size: int | None) -> int | None:
    """A validated block size: None (or 0) means no blocking."""
    if block_size is not None and block_size < 0:
        raise ValueError(f"block_size must be >= 1 (0 or None: no blocking), got {block_size}")
    return block_size or None


def regions(rows: int, cols: int, size: int | None) -> list[Region]:
    """The shape classes of ``size``-blocking (one region when ``size`` is None)."""
    if size is None:
        return [Region(slice(0, rows), slice(0, cols), rows, cols)]
    row_cuts = _cuts(rows, size)
    col_cuts = _cuts(cols, size)
    return [Region(rs, cs, br, bc) for rs, br in row_cuts for cs, bc in col_cuts]


def _cuts(n: int, size: int) -> list[tuple[slice, int]]:
    full = (n // size) * size
    cuts = [(slice(0, full), size)] if full else []
    if n - full:
        cuts.append((slice(full, n), n - full))
    return cuts


def gather(matrix: torch.Tensor, region: Region) -> torch.Tensor:
    """The region's blocks as a ``(n, br, bc)`` tensor, row-major block order."""
    part = matrix[region.rows, region.cols]
    nr, nc = part.size(0) // region.br, part.size(1) // region.bc
    tiled = part.reshape(nr, region.br, nc, region.bc).transpose(1, 2)
    return tiled.reshape(-1, region.br, region.bc)


def scatter(matrix: torch.Tensor, region: Region, blocks: torch.Tensor) -> None:
    """Write ``(n, br, bc)`` blocks back into the region of ``matrix`` (inverse of gather)."""
    part = matrix[region.rows, region.cols]
    nr, nc = part.size(0) // region.br, part.size(1) // region.bc
    part.copy_(blocks.reshape(nr, nc, region.br, region.bc).transpose(1, 2).reshape(part.shape))


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A tensor of two or more dimensions as a matrix: rows = dim 0, columns = the rest."""
    return t.reshape(t.size(0), -1)


def gram_update_(gram: torch.Tensor, x: torch.Tensor, beta: float, weight: float) -> None:
    """gram ← beta·gram + weight·x·xᵀ for batched ``x`` (n, r, c), computing only the upper
    block triangle of the symmetric product in chunks of 512 rows and mirroring it: about
    40% fewer FLOPs than one r×r product when r ≥ 1024 (the syrk BLAS routine torch lacks)."""
    rows = x.size(-2)
    chunk = 512
    if rows < 2 * chunk:
        gram.baddbmm_(x, x.mT, beta=beta, alpha=weight)
        return
    starts = list(range(0, rows, chunk))
    for a in starts:
        xa = x[:, a : a + chunk]
        for b in starts[starts.index(a) :]:
            block = gram[:, a : a + chunk, b : b + chunk]
            block.baddbmm_(xa, x[:, b : b + chunk].mT, beta=beta, alpha=weight)
            if b != a:
                gram[:, b : b + chunk, a : a + chunk].copy_(block.mT)
