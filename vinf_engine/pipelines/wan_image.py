"""Image conditioning of Wan's image-to-video models, laid out per global frame.

``WanImageToVideoPipeline`` conditions its transformer (``in_channels = 2 * z_dim + 4``) on
four mask channels and the VAE latents of a conditioning video, concatenated to the noisy
latents, and (Wan 2.1 I2V / FLF2V) on CLIP tokens of the image in every cross-attention. The
stock pipeline builds the conditioning video ``[image, zeros..., (last image)]`` and the mask
for the whole video at once. Here images may sit at any global frame, and each rank builds
only its clip's slice: the mask from the frames' indices, the condition latents by encoding
its clip of the conditioning video after a warm-up on the frames before it that the causal
encoder reads (``wan_vae.encode_clip``; every rank builds those frames itself: the images at
their frames, zeros elsewhere).
"""
from __future__ import annotations

import os

import torch

__all__ = ["takes_mask", "load_clip", "image_tokens", "mask_and_condition"]


def takes_mask(pipe) -> bool:
    """Whether the pipeline's transformer takes mask and condition channels (I2V, FLF2V)."""
    z = pipe.vae.config.z_dim
    return pipe.transformer.config.in_channels == 2 * z + pipe.vae_scale_factor_temporal


def load_clip(index: dict, path: str, dtype) -> dict:
    """The CLIP image encoder and processor of an image-to-video folder, of the classes its
    index names (Wan 2.1 I2V: ``CLIPVisionModel``, ``CLIPImageProcessor``; SkyReels-V2:
    ``CLIPVisionModelWithProjection``, ``CLIPProcessor``; any class with the same call works)."""
    import transformers
    from ..errors import GenerationError
    from .base import load_error
    out = {}
    for name in ("image_encoder", "image_processor"):
        cls = getattr(transformers, index[name][1], None)
        if cls is None:
            raise GenerationError(f"{name} class {index[name][1]!r} is not in transformers")
        kw = dict(dtype=dtype) if name == "image_encoder" else {}
        try:
            obj = cls.from_pretrained(os.path.join(path, name), local_files_only=True, **kw)
        except Exception as e:  # noqa: BLE001 - transformers raises many types
            raise GenerationError(f"cannot load {name} from {path!r}: {load_error(e)}") from None
        out[name] = obj.eval() if name == "image_encoder" else obj
    return out


def image_tokens(pipe, visual, device):
    """The CLIP tokens the transformer's cross-attentions read beside the text (Wan 2.1 I2V:
    the first image's; a first-last-frame model, ``pos_embed_seq_len`` set: the first and last
    images'; an extension: its last context frame's), or None for a model without them."""
    tr = pipe.transformer
    if tr.config.image_dim is None:
        return None
    images = [im for _, im in visual.keyframes]
    if visual.prefix is not None:
        chosen = [images[-1]]
    elif tr.config.pos_embed_seq_len is not None:
        chosen = [images[0], images[-1]]
    else:
        chosen = [images[0]]
    with torch.no_grad():
        embeds = pipe.encode_image(chosen if len(chosen) > 1 else chosen[0], device)
    return embeds.to(tr.dtype)


def _mask(kt: int, frames: tuple, n_video: int, latent: range, h: int, w: int, device):
    """Mask channels (1, kt, len(latent), h, w) of latent frames ``latent``: per video frame
    1 where an image is given, folded ``kt`` video frames to a latent frame, frame 0's value
    repeated ``kt`` times (WanImageToVideoPipeline's layout, per global frame)."""
    given = set(frames)
    rows = []
    for i in latent:
        video = [0] * kt if i == 0 else range(1 + kt * (i - 1), 1 + kt * i)
        rows.append([1.0 if f in given and f < n_video else 0.0 for f in video])
    m = torch.tensor(rows, device=device).t()                    # (kt, n)
    return m.view(1, kt, len(latent), 1, 1).expand(1, kt, len(latent), h, w)


def _video(pipe, plan, visual, video: range, device) -> torch.Tensor:
    """Frames ``video`` of the conditioning video (1, 3, n, H, W): each image at its frame,
    resized as the stock pipeline resizes it, zeros elsewhere."""
    out = torch.zeros(1, 3, len(video), plan.height, plan.width, device=device)
    for frame, image in visual.keyframes:
        if frame in video:
            out[:, :, frame - video.start] = pipe.video_processor.preprocess(
                image, height=plan.height, width=plan.width).to(device)[0]
    return out


def mask_and_condition(pipe, plan, frames: range, visual, device) -> torch.Tensor:
    """This rank's mask and condition channels (1, kt + z_dim, len(frames), h, w), fp32:
    the mask of its latent frames and the normalised latents of its clip of the conditioning
    video (the mode of the VAE's distribution, as the stock pipeline's ``argmax``)."""
    vae, kt = pipe.vae, pipe.vae_scale_factor_temporal
    h, w = plan.shape[3], plan.shape[4]
    with torch.no_grad():
        z = _condition_latents(pipe, plan, frames, visual, device)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
    cond = ((z - mean) * inv_std).float()
    mask = _mask(kt, visual.frames, plan.frames, frames, h, w, device)
    return torch.cat([mask, cond], dim=1)


def _condition_latents(pipe, plan, frames: range, visual, device) -> torch.Tensor:
    """The conditioning video's latent means of latent frames ``frames``: its clip encoded
    after a warm-up on the video frames before it that the causal encoder still reads
    (``wan_vae.encode_clip``: at most 109 frames for the released VAEs, whatever the clip's
    place in the video), so each rank's encode costs its clip, not the video up to it."""
    from ..wan_vae import _encode_tiles, encode_clip, encode_history_range
    vae = pipe.vae
    if _encode_tiles(vae, plan.height, plan.width):
        # encode_clip does not mirror tiled_encode: the stock encode from the video's start,
        # whose latents up to the clip's end depend on nothing later (the encoder is causal).
        upto = plan.video_frames(range(0, frames.stop))
        return vae.encode(_video(pipe, plan, visual, upto, device).to(vae.dtype)
                          ).latent_dist.mode()[:, :, frames.start:]
    clip = plan.video_frames(frames)
    history = encode_history_range(vae, frames.start)
    video = _video(pipe, plan, visual, range(history.start, clip.stop), device).to(vae.dtype)
    moments = encode_clip(vae, video[:, :, len(history):], start=frames.start,
                          history=video[:, :, :len(history)])
    return moments[:, :vae.config.z_dim]                   # the mean: the mode
