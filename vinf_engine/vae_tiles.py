"""What diffusers' tiled VAE decodes share, for the split decodes that mirror them."""
from __future__ import annotations

import torch

__all__ = ["blend_tile_grid"]


def blend_tile_grid(vae, rows: list, blend: tuple[int, int], keep: tuple[int, int]) -> torch.Tensor:
    """A tiled decode's join of decoded tiles ``rows[r][c]`` (B, C, m, th, tw): each tile
    blended into the one above it (``vae.blend_v`` over ``blend[0]`` rows) and to its left
    (``vae.blend_h`` over ``blend[1]`` columns), cut to ``keep`` (h, w), and concatenated; the
    stock blend functions in the stock order, so the same frames give the same bits. Blending
    is per frame: any run of frames may be joined alone. Tiles are modified in place, as
    diffusers does."""
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend[0])
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend[1])
            result_row.append(tile[:, :, :, :keep[0], :keep[1]])
        result_rows.append(torch.cat(result_row, dim=-1))
    return torch.cat(result_rows, dim=-2)
