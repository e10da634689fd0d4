"""A run's outputs on rank 0: every rank's decoded frames streamed to the video writer in
frame order, and the whole video's latents gathered into one file. Everything moves through
the run's ``ClipComm``, so its counters see it."""
from __future__ import annotations

import os

import numpy as np
import torch

from .checkpoint import save_temp

__all__ = ["stream_video", "gather_latents"]


def stream_video(chunks, comm, size: tuple, writer, note) -> int:
    """Write the video: rank 0 writes its own ``chunks`` ((n, H, W, 3) uint8 arrays, in frame
    order) as they are decoded, then each other rank's in rank order. Ranks > 0 decode all
    their chunks first (uint8 frames are small next to the latents on a GPU), so every rank
    decodes at once and rank 0 holds at most one foreign chunk. Each chunk goes as a frame
    count, then the frames; a count of 0 ends a rank's stream. Returns frames written (rank 0)."""
    H, W = size
    # The frames are on the host already; NCCL moves device tensors only.
    device = torch.device("cpu")
    if comm.backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    if comm.rank == 0:
        written = 0
        for arr in chunks:
            writer.write(arr)
            written += len(arr)
        for src in range(1, comm.world_size):
            count = torch.empty(1, dtype=torch.int64, device=device)
            while int(comm.recv(count, src)):
                buf = comm.recv(torch.empty((int(count), H, W, 3), dtype=torch.uint8,
                                            device=device), src)
                writer.write(buf.cpu().numpy())
                written += int(count)
            note(f"video: {written} frames written")
        return written
    decoded = [np.ascontiguousarray(a) for a in chunks]
    for arr in decoded + [None]:
        n = 0 if arr is None else len(arr)
        comm.send(torch.tensor([n], dtype=torch.int64, device=device), 0)
        if n:
            comm.send(torch.from_numpy(arr).to(device), 0)
    return 0


def gather_latents(latents: torch.Tensor, layout, comm, path: str) -> str | None:
    """The whole video's final latents ``(B, C, F, h, w)`` fp32 in one ``.pt`` file, written
    by rank 0 to a temporary file beside ``path``, whose name is returned (None elsewhere) for
    the caller to move into place once the video is complete too."""
    device = latents.device
    if comm.rank == 0:
        parts = [latents.float().cpu()]
        for src in range(1, comm.world_size):
            shape = list(latents.shape)
            shape[2] = layout.sizes[src]
            parts.append(comm.recv(torch.empty(shape, dtype=torch.float32, device=device), src).cpu())
        directory, name = os.path.split(os.path.abspath(path))
        return save_temp({"latents": torch.cat(parts, dim=2)}, directory, prefix=f".{name}.",
                         suffix=".partial")
    comm.send(latents.float(), 0)
    return None
