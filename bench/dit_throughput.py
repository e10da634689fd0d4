"""The DiT throughput bench: a video DiT of any family the engine runs (``--family wan``, ``ltx``,
``cogvideox``, ``hunyuan``, ``skyreels``) denoising a video of 1x, 2x and 4x its trained length
(the engine's own figure for the family: Wan 2.1 21 latent frames, LTX-Video 21, CogVideoX-5b 13,
HunyuanVideo 33, SkyReels-V2 25), side by side:

    engine R ranks        vinf_engine.parallelize(transformer, DualScopeConfig(window, num_global))
                          on R ranks (gloo on CPU, NCCL on GPUs), each rank its own clip
    engine 1 rank         the same algorithm in one process (the partition-invariance oracle)
    diffusers dense       the stock transformer, dense attention over the whole video
    diffusers Ulysses     diffusers' own context parallelism (ContextParallelConfig(ulysses_degree=R)
                          + enable_parallelism), R ranks; only where the family's diffusers model
                          has a ``_cp_plan`` (Wan, LTX-Video in diffusers 0.42.1; a skipped row
                          says so elsewhere); ring attention: see RING_ON_CPU

    python bench/dit_throughput.py --family ltx              # CPU: small random LTX, 2 gloo ranks
    python bench/dit_throughput.py --family wan --device cuda # GPUs: the published shape, bf16
    python bench/throughput.py --model wan                   # the same bench, Wan (as before)
    python bench/ltx_long.py                                 # LTX: diffusers' long-video pipeline
                                                             # beside the engine's generate

Shapes (``--preset``): ``tiny`` (the tests'), ``cpu`` (the CPU default: 64 tokens per latent
frame, 2 x 64-dim heads) and the published model's shape, the default on ``--device cuda``:
Wan2.1-T2V-1.3B at 480x832; LTX-Video 0.9 (2B, diffusers' default config) at 512x704;
CogVideoX-5b at 480x720; HunyuanVideo 1.0 (13B, diffusers' default config) at 544x960.
SkyReels-V2 has no published shape here: its ``cuda`` preset is Wan 2.1 1.3B's transformer
shape at 544x960, a stand-in not checked against a SkyReels-V2 config. The GPU presets are
unmeasured until a GPU runs them (bench/RESULTS.md says which were).

Per row (one method at one length): seconds per denoising step (classifier-free guidance as
batch 2 at the family pipeline's scale; HunyuanVideo: its embedded guidance, batch 1;
flow-matching Euler for every family, whose scheduler costs nothing beside the model;
``--steps`` timed steps after one untimed warm-up forward), the per-frame cost (rank-seconds
per frame-step: step time x ranks / frames) and its ratio to dense at the same length and to
the same method at 1x, peak memory per rank, bytes sent / received per rank per step, and for
the engine rows the relative difference between the R-rank and the 1-rank outputs (partition
invariance). Each row is printed and added to the JSON file as soon as it is measured (a run
cut short keeps its rows); the figures that compare rows are added when both rows exist.
Weights are random (never downloaded): timings do not depend on them.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import sys
import time
import warnings
from typing import Callable

import torch

import vinf_engine as vinf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/: the shared harness
import harness  # noqa: E402
from harness import fmt, peak_memory_mib, rel_diff  # noqa: E402


# ------------------------------------------------------------------------------ families
def _text(width: int):
    """Text embeddings (B, L, width): the conditioning of Wan, SkyReels-V2 and CogVideoX."""
    def make(kw, length, batch, g):
        return torch.randn(batch, length, kw[width], generator=g)
    return make


def _text_and_mask(width: str, pooled: str | None = None):
    """(text (B, L, width), mask (B, L)[, pooled (B, P)]): LTX-Video's and HunyuanVideo's."""
    def make(kw, length, batch, g):
        out = (torch.randn(batch, length, kw[width], generator=g),
               torch.ones(batch, length, dtype=torch.long))
        return out + ((torch.randn(batch, kw[pooled], generator=g),) if pooled else ())
    return make


def _call_wan(model, x, t, text):
    """Wan and SkyReels-V2: (B, C, F, h, w) in and out."""
    return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


LTX_ROPE_SCALE = (8 / 25, 32, 32)     # LTXPipeline's rope_interpolation_scale at 25 fps


def _call_ltx(model, x, t, cond):
    """LTX-Video: packed tokens (B, F*h*w, C) as LTXPipeline._pack_latents, with the frame
    count and grid; the output unpacked to (B, C, F, h, w)."""
    text, mask = cond
    B, C, F, h, w = x.shape
    out = model(hidden_states=x.permute(0, 2, 3, 4, 1).flatten(1, 3), encoder_hidden_states=text,
                timestep=t, encoder_attention_mask=mask, num_frames=F, height=h, width=w,
                rope_interpolation_scale=LTX_ROPE_SCALE, return_dict=False)[0]
    return out.unflatten(1, (F, h, w)).permute(0, 4, 1, 2, 3)


def _cog_rope(model, frames: int, h: int, w: int):
    """``image_rotary_emb`` as CogVideoXPipeline._prepare_rotary_positional_embeddings makes
    it for ``frames`` latent frames of h x w latents (CogVideoX 1.0 with RoPE: 5b). Under the
    engine each rank passes its clip's table; the engine rotates at global positions."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    c = model.config
    p = c.patch_size
    crops = get_resize_crop_region_for_grid((h // p, w // p), c.sample_width // p,
                                            c.sample_height // p)
    cos, sin = get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops,
                                       grid_size=(h // p, w // p), temporal_size=frames)
    return cos.to(model.device), sin.to(model.device)


def _call_cogvideox(model, x, t, text):
    """CogVideoX: frames along dim 1 of the model's input (B, F, C, h, w)."""
    rot = _cog_rope(model, x.shape[2], x.shape[3], x.shape[4])
    out = model(hidden_states=x.transpose(1, 2), encoder_hidden_states=text, timestep=t,
                image_rotary_emb=rot, return_dict=False)[0]
    return out.transpose(1, 2)


HUNYUAN_GUIDANCE = 6.0        # HunyuanVideoPipeline's embedded guidance (x 1000 in the call)


def _call_hunyuan(model, x, t, cond):
    text, mask, pooled = cond
    g = torch.full_like(t, HUNYUAN_GUIDANCE * 1000.0)
    return model(hidden_states=x, timestep=t, encoder_hidden_states=text,
                 encoder_attention_mask=mask, pooled_projections=pooled, guidance=g,
                 return_dict=False)[0]


@dataclasses.dataclass(frozen=True)
class Family:
    """What the bench needs of a family beside what the engine's registry says (the trained
    length, the default config: ``engine_module``'s ``trained_frames`` and ``adapter``'s
    ``default_config``): its diffusers class, shapes, conditioning and stock call."""

    model_class: str              # diffusers class name
    engine_module: str            # vinf_engine.models.<engine_module>
    adapter: str                  # its adapter class
    base: dict                    # constructor arguments every preset shares
    presets: dict                 # name -> model (constructor arguments), latent_hw, text_len,
                                  # steps, dtype
    gpu_preset: str               # the default on --device cuda
    text_width: str               # the config field of the text embeddings' width
    make_text: Callable           # (constructor kwargs, text_len, batch, generator) -> cond
    call: Callable                # (model, x (B, C, F, h, w), t (B,), cond) -> (B, C, F, h, w)
    guidance: float               # CFG scale (batch 2); 0: embedded guidance (batch 1)
    flow_shift: float             # the Euler scheduler's shift

    def kwargs(self, preset: str) -> dict:
        return {**self.base, **self.presets[preset]["model"]}


# Shapes every family's CPU presets share: "tiny" runs in seconds (use it with --frames 3,6,12
# or so: 4 tokens per latent frame); "cpu" has 64 tokens per latent frame (latent 16x16 at
# patch 2; LTX's patch 1: 8x8) and 2 x 64-dim heads, so that attention matters
# (Wan: SDPA is 36% / 53% / 68% of a dense forward at 21 / 42 / 84 frames, one thread).
_TINY = dict(latent_hw=(4, 4), text_len=4, steps=1, dtype="float32")
_CPU = dict(latent_hw=(16, 16), text_len=16, steps=3, dtype="float32")

_WAN_BASE = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_WAN_TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=32,
                 text_dim=16, freq_dim=16)
_WAN_CPU = dict(num_layers=2, num_attention_heads=2, attention_head_dim=64, ffn_dim=512,
                text_dim=64, freq_dim=64)
# diffusers' Wan2.1-T2V-1.3B config.
_WAN_13B = dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                text_dim=4096, freq_dim=256)

FAMILIES = {
    "wan": Family(
        "WanTransformer3DModel", "wan", "WanAdapter", _WAN_BASE,
        {"tiny": dict(_TINY, model=_WAN_TINY), "cpu": dict(_CPU, model=_WAN_CPU),
         # 480x832: latent 60x104, 1,560 tokens per frame
         "wan2.1-1.3b": dict(model=_WAN_13B, latent_hw=(60, 104), text_len=512, steps=2,
                             dtype="bfloat16")},
        "wan2.1-1.3b", "text_dim", _text("text_dim"), _call_wan, guidance=5.0, flow_shift=3.0),
    "skyreels": Family(
        "SkyReelsV2Transformer3DModel", "skyreels_v2", "SkyReelsV2Adapter", _WAN_BASE,
        {"tiny": dict(_TINY, model=_WAN_TINY), "cpu": dict(_CPU, model=_WAN_CPU),
         # a stand-in (see the docstring): Wan 2.1 1.3B's shape at 544x960 (latent 68x120)
         "wan1.3b-shape-540p": dict(model=_WAN_13B, latent_hw=(68, 120), text_len=512, steps=2,
                                    dtype="bfloat16")},
        "wan1.3b-shape-540p", "text_dim", _text("text_dim"), _call_wan, guidance=6.0,
        flow_shift=8.0),
    "ltx": Family(
        # 8 latent channels and 16-wide captions on CPU: the tiny VAE and T5 of the LTX
        # pipeline bench/ltx_long.py builds take these presets' transformers as they are.
        "LTXVideoTransformer3DModel", "ltx", "LTXAdapter", dict(patch_size=1, patch_size_t=1),
        # Patch 1: half the other families' latent size, for the same tokens per frame.
        {"tiny": dict(_TINY, latent_hw=(2, 2),
                      model=dict(in_channels=8, out_channels=8, num_attention_heads=2,
                                 attention_head_dim=8, cross_attention_dim=16, num_layers=1,
                                 caption_channels=16)),
         "cpu": dict(_CPU, latent_hw=(8, 8),
                     model=dict(in_channels=8, out_channels=8, num_attention_heads=2,
                                attention_head_dim=64, cross_attention_dim=128, num_layers=2,
                                caption_channels=16)),
         # diffusers' default config = LTX-Video 0.9's 2B; 512x704: latent 16x22
         "ltx-video-2b": dict(model={}, latent_hw=(16, 22), text_len=128, steps=2,
                              dtype="bfloat16")},
        "ltx-video-2b", "caption_channels", _text_and_mask("caption_channels"), _call_ltx,
        guidance=3.0, flow_shift=1.0),
    "cogvideox": Family(
        # CogVideoX 1.0 with RoPE (5b); trained length from sample_frames: 49 -> 13 latent
        "CogVideoXTransformer3DModel", "cogvideox", "CogVideoXAdapter",
        dict(patch_size=2, use_rotary_positional_embeddings=True, in_channels=16,
             out_channels=16),
        {"tiny": dict(_TINY, model=dict(num_attention_heads=2, attention_head_dim=16,
                                        time_embed_dim=16, text_embed_dim=8, num_layers=1,
                                        sample_width=8, sample_height=8, sample_frames=9,
                                        max_text_seq_length=4)),
         "cpu": dict(_CPU, model=dict(num_attention_heads=2, attention_head_dim=64,
                                      time_embed_dim=64, text_embed_dim=64, num_layers=2,
                                      sample_width=16, sample_height=16, sample_frames=49,
                                      max_text_seq_length=16)),
         # CogVideoX-5b; 480x720: latent 60x90
         "cogvideox-5b": dict(model=dict(num_attention_heads=48, attention_head_dim=64,
                                         time_embed_dim=512, text_embed_dim=4096,
                                         num_layers=42, sample_width=90, sample_height=60,
                                         sample_frames=49, max_text_seq_length=226),
                              latent_hw=(60, 90), text_len=226, steps=2, dtype="bfloat16")},
        "cogvideox-5b", "text_embed_dim", _text("text_embed_dim"), _call_cogvideox,
        guidance=6.0, flow_shift=1.0),
    "hunyuan": Family(
        "HunyuanVideoTransformer3DModel", "hunyuan_video", "HunyuanVideoAdapter",
        dict(patch_size=2, patch_size_t=1, guidance_embeds=True),
        {"tiny": dict(_TINY, model=dict(in_channels=4, out_channels=4, num_attention_heads=2,
                                        attention_head_dim=16, num_layers=1,
                                        num_single_layers=1, num_refiner_layers=1,
                                        mlp_ratio=2.0, text_embed_dim=8,
                                        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))),
         "cpu": dict(_CPU, model=dict(in_channels=16, out_channels=16, num_attention_heads=2,
                                      attention_head_dim=64, num_layers=1,
                                      num_single_layers=1, num_refiner_layers=1,
                                      text_embed_dim=64, pooled_projection_dim=64,
                                      rope_axes_dim=(16, 24, 24))),
         # diffusers' default config = HunyuanVideo 1.0 (13B); 544x960: latent 68x120
         "hunyuanvideo": dict(model={}, latent_hw=(68, 120), text_len=256, steps=2,
                              dtype="bfloat16")},
        "hunyuanvideo", "text_embed_dim", _text_and_mask("text_embed_dim", "pooled_projection_dim"),
        _call_hunyuan, guidance=0.0, flow_shift=7.0),
}
PRESET_NAMES = sorted({p for f in FAMILIES.values() for p in f.presets})

# The Wan presets under their old names (bench/memory.py imports them).
PRESETS = {name: dict(p, model=dict(p["model"])) for name, p in FAMILIES["wan"].presets.items()}
WAN21 = _WAN_BASE

METHODS = ("engine", "engine1", "dense", "ulysses", "ring")
DEFAULT_METHODS = "engine,engine1,dense,ulysses"
MULTI = ("engine", "ulysses", "ring")          # run on R ranks; the others on one
LABELS = {"engine": "engine {R} ranks", "engine1": "engine 1 rank", "dense": "diffusers dense",
          "ulysses": "diffusers Ulysses {R} ranks", "ring": "diffusers ring {R} ranks"}

# What diffusers 0.42.1's context parallelism needs to run on CPU processes joined by gloo,
# found by running it (this bench, method "ulysses", Wan and LTX):
#  1. ModelMixin._resolve_parallel_config does
#         device = torch.device(torch._C._get_accelerator().type, rank % torch.accelerator.device_count())
#     On a CPU-only torch the accelerator is "cpu" but device_count() is 0: ZeroDivisionError.
#     We patch torch.accelerator.device_count to return 1 while enable_parallelism runs. The
#     device type stays "cpu", so init_device_mesh builds a CPU DeviceMesh over the gloo world
#     group, and the collectives (functional all_to_all_single, all_gather_tensor) run on gloo.
#  2. The attention backend must support context parallelism and run on CPU: only "native"
#     (torch SDPA) does. It does not return the log-sum-exp, so it serves Ulysses but not ring.
#  3. The model must be called with return_dict=False: the split hook on the root module checks
#     in its post_forward that the output is a tensor or a tuple of tensors, and rejects the
#     Transformer2DModelOutput of return_dict=True (not CPU-specific; diffusers' pipelines pass
#     return_dict=False).
#  4. Every rank holds the whole video: the plan splits the token sequence after the patch
#     embedding (blocks.0 input and the RoPE tables, dim 1; LTX: the text and its mask too) and
#     all-gathers the output at proj_out. Plain Ulysses needs heads % R == 0 and tokens
#     (frames x h' x w', LTX: and text) % R == 0 (EquipartitionSharder asserts); otherwise we
#     set ulysses_anything=True.
# Checked by running ring on 2 gloo ranks: diffusers' native backend refuses (it returns no
# LSE); its _native_flash and _native_cudnn backends (bf16) fail because aten has no CPU kernel
# for _scaled_dot_product_flash_attention; their setup (set_attention_backend,
# enable_parallelism) works on CPU.
RING_ON_CPU = (
    "not run on CPU: ring attention (TemplatedRingAttention) merges partial attention by "
    "log-sum-exp, so it needs an attention backend that returns the LSE; in diffusers 0.42.1 "
    "those are _native_flash / _native_cudnn (aten::_scaled_dot_product_flash_attention / "
    "_cudnn_attention have no CPU kernel), flash-attn, flash-3 and sage: CUDA only; the CPU "
    "backend, native SDPA, raises on return_lse=True")




def wan_kwargs(preset: dict) -> dict:
    """A Wan preset's constructor arguments (bench/memory.py)."""
    return {**_WAN_BASE, **preset["model"]}


def _engine_side(family: Family):
    """The engine's registry entries for ``family``: its ``trained_frames`` and its adapter."""
    mod = importlib.import_module(f"vinf_engine.models.{family.engine_module}")
    return mod.trained_frames, getattr(mod, family.adapter)


def _meta_model(family: Family, preset: str):
    import diffusers
    with torch.device("meta"):
        return getattr(diffusers, family.model_class)(**family.kwargs(preset))


def trained_length(family: Family, preset: str) -> int:
    """The 1x length: the engine's own notion of the model's trained length, from a model
    built on the meta device (no memory, no weights)."""
    model = _meta_model(family, preset)
    return _engine_side(family)[0](model)


def default_config(family: Family, preset: str) -> dict:
    """The engine's default dual-scope window and global frames for the family's model."""
    model = _meta_model(family, preset)
    cfg = _engine_side(family)[1].default_config(model)
    return dict(window=cfg.window, num_global=cfg.num_global)


def build(family: Family, preset: str, device, dtype):
    """A random transformer of ``family`` at ``preset``, the same on every rank and in every
    process (seeded; built on ``device`` directly: a 1.3B model initialises in well under a
    second on a GPU). Parameters diffusers initialises to zero get small noise, so every
    module matters."""
    import diffusers
    torch.manual_seed(0)
    with torch.device(device):
        m = getattr(diffusers, family.model_class)(**family.kwargs(preset))
    g = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)
    if dtype != torch.float32:
        # As from_pretrained(torch_dtype=...) loads it: the modules diffusers keeps in fp32
        # (Wan: time embedder, modulation table, norms; the RoPE tables are buffers) stay fp32.
        keep = set(getattr(m, "_keep_in_fp32_modules", None) or ())
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not keep & set(name.split(".")):
                    p.data = p.data.to(dtype)
    return m.eval()


def build_wan(preset: dict, device, dtype):
    """``build`` for a Wan preset dict (bench/memory.py's entry, with its layer override)."""
    fam = dataclasses.replace(FAMILIES["wan"], presets={"_": preset})
    return build(fam, "_", device, dtype)


def has_cp_plan(family: Family) -> bool:
    """Whether diffusers can run the family's model context-parallel (a ``_cp_plan``)."""
    import diffusers
    return getattr(getattr(diffusers, family.model_class), "_cp_plan", None) is not None


class CollectiveCounter:
    """Bytes and launches of the collectives diffusers' context parallelism calls, counted by
    wrapping them (only while ``active``): the functional ``all_to_all_single`` and
    ``all_gather_tensor`` (Ulysses' 4 all-to-alls per self-attention, the output all-gather,
    ring's K/V all-gather) and ``torch.distributed.all_gather`` (masks, "anything" sizes).
    Per rank: an all-to-all sends the (R-1)/R of its input meant for the others and receives as
    much; an all-gather sends its shard to R-1 peers and receives theirs (the engine's own
    all-gather counts the same way)."""

    def __init__(self):
        self.active = False
        self.bytes_sent = self.bytes_received = self.collectives = 0
        self._undo = []

    def reset(self):
        self.bytes_sent = self.bytes_received = self.collectives = 0

    def snapshot(self) -> dict:
        return dict(bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
                    collectives=self.collectives)

    def _add(self, sent, received):
        if self.active:
            self.collectives += 1
            self.bytes_sent += int(sent)
            self.bytes_received += int(received)

    def install(self):
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        def world_rank(group):
            return dist.get_world_size(group), dist.get_rank(group)

        def nbytes(t):
            return t.numel() * t.element_size()

        a2a, ag_t, ag = funcol.all_to_all_single, funcol.all_gather_tensor, dist.all_gather

        def all_to_all_single(x, output_split_sizes, input_split_sizes, group, *a, **k):
            W, r = world_rank(group)
            if input_split_sizes is None:
                sent = nbytes(x) * (W - 1) / W
                received = sent
            else:
                row = nbytes(x) / max(1, x.shape[0])
                sent = row * (sum(input_split_sizes) - input_split_sizes[r])
                received = row * (sum(output_split_sizes) - output_split_sizes[r])
            self._add(sent, received)
            return a2a(x, output_split_sizes, input_split_sizes, group, *a, **k)

        def all_gather_tensor(x, gather_dim, group, *a, **k):
            W, _ = world_rank(group)
            self._add(nbytes(x) * (W - 1), nbytes(x) * (W - 1))
            return ag_t(x, gather_dim, group, *a, **k)

        def all_gather(tensor_list, tensor, group=None, *a, **k):
            W, r = world_rank(group)
            self._add(nbytes(tensor) * (W - 1),
                      sum(nbytes(t) for i, t in enumerate(tensor_list) if i != r))
            return ag(tensor_list, tensor, group, *a, **k)

        funcol.all_to_all_single, funcol.all_gather_tensor = all_to_all_single, all_gather_tensor
        dist.all_gather = all_gather
        self._undo = [(funcol, "all_to_all_single", a2a), (funcol, "all_gather_tensor", ag_t),
                      (dist, "all_gather", ag)]
        return self

    def uninstall(self):
        for mod, name, fn in self._undo:
            setattr(mod, name, fn)
        self._undo = []


def enable_context_parallel(model, method, world, opts, device):
    """diffusers' own context parallelism on ``model``: Ulysses (``ulysses_degree=world``,
    "native" SDPA backend) or ring (``ring_degree=world``, "_native_flash", CUDA only)."""
    from diffusers import ContextParallelConfig
    heads = model.config.num_attention_heads
    patch = model.config.patch_size                   # Wan (t, h, w); LTX one int (t: 1)
    pt, ph, pw = patch if isinstance(patch, (tuple, list)) else (1, patch, patch)
    h, w = opts["latent_hw"]
    tokens = [f // pt * (h // ph) * (w // pw) for f in opts["frames"]]
    # LTX's plan splits the text tokens too (encoder_hidden_states, its mask: dim 1)
    text = [opts["text_len"]] if "encoder_hidden_states" in model._cp_plan.get("", {}) else []
    uneven = heads % world != 0 or any(n % world for n in tokens + text)
    if method == "ulysses":
        model.set_attention_backend("native")
        cp = ContextParallelConfig(ulysses_degree=world, ulysses_anything=uneven)
    else:
        model.set_attention_backend("_native_flash")
        cp = ContextParallelConfig(ring_degree=world, ring_anything=any(n % world for n in tokens))
    count = torch.accelerator.device_count
    if device.type == "cpu":
        torch.accelerator.device_count = lambda: 1      # see note 1 above the presets
    try:
        model.enable_parallelism(config=cp)
    finally:
        torch.accelerator.device_count = count
    return dict(ulysses_anything=cp.ulysses_anything, ring_anything=cp.ring_anything,
                backend="native" if method == "ulysses" else "_native_flash")


def measure(family, model, method, rank, world, frames, opts, device, dtype, cond, counter):
    """One method at one length: warm-up forward, then ``steps`` timed Euler steps (CFG as
    batch 2 where the family guides so). Returns this rank's record and its final latents
    (its clip, or the whole video)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    h, w = opts["latent_hw"]
    engine = getattr(model, "vinf_engine", None)
    mine = vinf.ClipLayout(frames, world).frames(rank) if engine is not None else range(frames)
    shape = (1, model.config.in_channels, frames, h, w)
    latents = vinf.initial_noise(opts["seed"], shape, mine, device=device, dtype=torch.float32)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=family.flow_shift)
    sched.set_timesteps(opts["steps"])        # CPU timesteps
    batch = 2 if family.guidance else 1

    def eps(x, t):
        # On a GPU the timestep must be on the device (Wan's time embedder is a Linear there);
        # the engine reads it on the host when it agrees on the step: one device sync per step.
        tt = torch.full((batch,), float(t), device=device)
        out = family.call(model, torch.cat([x] * batch).to(dtype), tt, cond).float()
        if batch == 1:
            return out
        uncond, c = out.chunk(2)
        return uncond + family.guidance * (c - uncond)

    with torch.no_grad():
        eps(latents, sched.timesteps[0])                  # warm-up, not timed
        harness.sync(device, world)
        peak_reset = harness.reset_peak_memory(device)
        comm = engine.comm.counters if engine is not None else counter
        if comm is not None:
            comm.reset()
        if counter is not None:
            counter.active = True
        t0 = time.perf_counter()
        for t in sched.timesteps:
            latents = sched.step(eps(latents, t), t, latents).prev_sample
        harness.sync(device, world)
        seconds = time.perf_counter() - t0
        if counter is not None:
            counter.active = False
    rec = dict(seconds=seconds, peak_mib=peak_memory_mib(device), peak_reset=peak_reset)
    if comm is not None:
        rec.update(comm.snapshot())
    return rec, latents.cpu()


def _combine(method, world, frames, recs, opts) -> dict:
    """One table row from every rank's record of one method at one length."""
    steps = opts["steps"]
    row = dict(name=LABELS[method].format(R=world), method=method, ranks=world,
               threads_per_rank=opts["threads"], frames=frames,
               x_trained=round(frames / opts["trained"], 3), steps=steps)
    errors = [r["error"] for r in recs if "error" in r]
    if errors:
        row["error"] = errors[0]
        return row
    sps = max(r["seconds"] for r in recs) / steps
    row.update(seconds_per_step=sps, ms_per_frame_step=sps * world / frames * 1e3,
               peak_mib_per_rank=[round(r["peak_mib"], 1) for r in recs],
               peak_is_since_warmup=all(r["peak_reset"] for r in recs))
    if "bytes_sent" in recs[0]:
        row["mib_sent_per_rank_per_step"] = [r["bytes_sent"] / steps / 2**20 for r in recs]
        row["mib_received_per_rank_per_step"] = [r["bytes_received"] / steps / 2**20 for r in recs]
        row["collectives_per_step"] = max(r["collectives"] for r in recs) / steps
    if method in ("ulysses", "ring"):
        row["context_parallel"] = opts.get("_cp_info")
    return row


def _gather(rec, world, group):
    if world == 1:
        return [rec]
    out = [None] * world
    torch.distributed.all_gather_object(out, rec, group=group)
    return out


def worker(rank, world, opts):
    """One rank of one spawn: every method in ``opts["methods"]`` (all on ``world`` ranks), at
    every length in ``opts["frames"]`` (ascending); rank 0 writes each row as it is measured.
    Returns {method: {frames: this rank's final latents}} for the comparisons."""
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)   # funcol.all_gather_tensor
    warnings.filterwarnings("ignore", message=".*trained range.*")
    device = torch.device(f"cuda:{rank}" if opts["device"] == "cuda" else "cpu")
    dtype = getattr(torch, opts["dtype"])
    family = FAMILIES[opts["family"]]
    group = None
    if world > 1 and device.type == "cuda":
        group = torch.distributed.new_group(backend="gloo")     # rows travel on the CPU
    g = torch.Generator().manual_seed(opts["seed"] + 1)
    cond = family.make_text(family.kwargs(opts["preset"]), opts["text_len"],
                            2 if family.guidance else 1, g)
    cond = tuple(c.to(device, dtype if c.is_floating_point() else c.dtype) for c in cond) \
        if isinstance(cond, tuple) else cond.to(device, dtype)
    results = {}
    for method in opts["methods"]:
        results[method] = {}
        counter, model, failed = None, None, None
        try:
            model = build(family, opts["preset"], device, dtype)
            if method in ("engine", "engine1"):
                vinf.parallelize(model, vinf.DualScopeConfig(**opts["config"]))
            else:
                if method in ("ulysses", "ring"):
                    opts["_cp_info"] = enable_context_parallel(model, method, world, opts, device)
                    counter = CollectiveCounter().install()
        except Exception as e:   # noqa: BLE001 - becomes the method's rows
            failed = f"setup: {type(e).__name__}: {e}"[:600]
        c = cond
        if method in ("ulysses", "ring") and isinstance(cond, tuple) and bool(cond[1].all()):
            # diffusers 0.42.1's Ulysses fails on LTX's text mask (SDPA: "output with shape
            # [2, 1, S, L] doesn't match the broadcast shape [2, 2, S, L]"); this mask keeps
            # every token, so without it the attention is the same (checked: vs dense)
            c = (cond[0], None, *cond[2:])
        for frames in opts["frames"]:
            if failed:
                rec, lat = dict(error=failed), None
            else:
                try:
                    rec, lat = measure(family, model, method, rank, world, frames, opts,
                                       device, dtype, c, counter)
                except Exception as e:   # noqa: BLE001
                    oom = "out of memory" in str(e).lower()
                    rec, lat = dict(error="out of memory" if oom else
                                    f"{type(e).__name__}: {e}"[:600]), None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            recs = _gather(rec, world, group)
            if rank == 0:
                row = _combine(method, world, frames, recs, opts)
                harness.append_row(opts["out"], row)
                print_row(row)
            if any("error" in r for r in recs):
                failed = failed or f"not run: failed at {frames} frames"
            elif lat is not None and (rank == 0 or method not in ("ulysses", "ring")):
                results[method][frames] = lat          # Ulysses/ring: every rank has it all
        if counter is not None:
            counter.uninstall()
        if getattr(model, "vinf_engine", None) is not None:
            vinf.unparallelize(model)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------ the report
def print_row(row):
    if "error" in row or "skipped" in row:
        why = row.get("error") or row.get("skipped")
        at = f" @ {row['frames']} frames" if row.get("frames") else ""
        print(f"  {row['name']}{at}: {why}", flush=True)
        return
    comm = ""
    if "mib_sent_per_rank_per_step" in row:
        comm = (f", {max(row['mib_sent_per_rank_per_step']):.2f} MiB sent / "
                f"{max(row['mib_received_per_rank_per_step']):.2f} received per rank per step")
    print(f"  {row['name']} @ {row['frames']} frames: {row['seconds_per_step']:.3f} s/step, "
          f"{row['ms_per_frame_step']:.1f} ms per frame-step, peak "
          f"{max(row['peak_mib_per_rank']):.0f} MiB/rank{comm}", flush=True)


def add_comparisons(rows, latents):
    """The figures that compare rows: partition invariance (engine R ranks vs 1 rank, same
    length), Ulysses vs dense output, per-frame cost vs dense and vs the same method at 1x."""
    ok = {(r["method"], r["frames"]): r for r in rows if "error" not in r and "skipped" not in r}
    frames = sorted({f for _, f in ok})
    for (method, f), r in ok.items():
        dense = ok.get(("dense", f))
        if dense is not None and method != "dense":
            r["per_frame_vs_dense"] = r["ms_per_frame_step"] / dense["ms_per_frame_step"]
        first = ok.get((method, frames[0])) if frames else None
        if first is not None:
            r["per_frame_vs_1x"] = r["ms_per_frame_step"] / first["ms_per_frame_step"]
    for (method, f), r in ok.items():
        if method == "engine":
            a = latents.get("engine", {}).get(f)
            b = latents.get("engine1", {}).get(f)
            if a is not None and b is not None:
                r["max_rel_diff_vs_1_rank"] = rel_diff(a, b)
        if method == "engine1":          # how far dual-scope attention is from dense (JSON only)
            a = latents.get("engine1", {}).get(f)
            b = latents.get("dense", {}).get(f)
            if a is not None and b is not None:
                r["output_rel_diff_vs_dense"] = rel_diff(a, b)
        if method in ("ulysses", "ring"):
            a = latents.get(method, {}).get(f)
            b = latents.get("dense", {}).get(f)
            if a is not None and b is not None:
                r["max_rel_diff_vs_dense"] = rel_diff(a, b)


COLUMNS = [("run", 28), ("frames", 7), ("s/step", 9), ("ms/frame", 10), ("vs dense", 9),
           ("vs 1x", 7), ("peak MiB", 10), ("MiB sent", 10), ("MiB recv", 10), ("launch", 8),
           ("rel diff", 10)]


def _cells(r) -> list:
    """One measured row's cells of the table (an error: its text)."""
    if "error" in r:
        return [r["name"], str(r["frames"]), r["error"][:80]]
    sent = r.get("mib_sent_per_rank_per_step")
    recv = r.get("mib_received_per_rank_per_step")
    diff = r.get("max_rel_diff_vs_1_rank" if r["method"] == "engine" else "max_rel_diff_vs_dense")
    return [r["name"], str(r["frames"]), f"{r['seconds_per_step']:.3f}",
            f"{r['ms_per_frame_step']:.1f}", fmt(r.get("per_frame_vs_dense"), ".2f"),
            fmt(r.get("per_frame_vs_1x"), ".2f"), f"{max(r['peak_mib_per_rank']):.0f}",
            fmt(max(sent) if sent else None, ".2f"), fmt(max(recv) if recv else None, ".2f"),
            fmt(r.get("collectives_per_step"), ".0f"), fmt(diff, ".1e")]


def print_table(rows, methods):
    """Rows by length, then method (in ``methods``' order); rows of no length (skipped) last."""
    order = {m: i for i, m in enumerate(methods)}
    measured = [r for r in rows if r.get("frames") is not None]
    lines = [_cells(r) for r in sorted(measured, key=lambda r: (r["frames"], order.get(r["method"], 99)))]
    lines += [[r["name"], "", str(r.get("skipped") or r.get("error"))] for r in rows
              if r.get("frames") is None]
    harness.print_table(COLUMNS, lines)


# ------------------------------------------------------------------------------ parse
@dataclasses.dataclass
class Plan:
    """The command line, resolved: defaults by device and preset, checked before any spawn."""
    args: argparse.Namespace
    ranks: int
    methods: list         # without ring on CPU once the ring row is written (see skip_ring)
    base: dict            # what every rank receives (see worker), but methods and threads
    timeout: float
    backend: str


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=tuple(FAMILIES), default="wan")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--preset", choices=PRESET_NAMES, default=None,
                    help="model shape (default: cpu on cpu, the published shape on cuda: "
                         + ", ".join(f"{n}: {f.gpu_preset}" for n, f in FAMILIES.items()) + ")")
    ap.add_argument("--frames", default=None,
                    help="latent frames of each length, comma-separated, ascending (default: "
                         "1x, 2x, 4x the trained length, e.g. Wan's 21,42,84)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed denoising steps per row, after one untimed warm-up forward")
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the engine and of Ulysses")
    ap.add_argument("--window", type=int, default=None,
                    help="engine: local window (default: the family's, e.g. Wan's 8)")
    ap.add_argument("--num-global", type=int, default=None,
                    help="engine: global frames (default: the family's, e.g. Wan's 8)")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help=f"comma-separated, from {METHODS} (engine: R ranks; engine1: 1 rank; "
                         "ring: CUDA only, opt-in)")
    ap.add_argument("--latent", default=None, help="latent HxW, e.g. 8x8 (default: the preset's)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="default: the preset's (float32 on the CPU presets, bfloat16 on GPUs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads per rank (default 1, so that every row's per-frame "
                         "cost is core-time and 1- and R-rank rows compare; 0: cores // ranks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per spawn of ranks (default 900 on cpu, 3600 on cuda)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/out/throughput-<family>-<device>.json)")
    return ap


def _frames(ap, a, trained, R) -> list:
    """The lengths: --frames, or 1x, 2x and 4x the trained length."""
    if a.frames:
        try:
            frames = sorted({int(f) for f in a.frames.split(",")})
            assert frames and frames[0] >= 1
        except (ValueError, AssertionError):
            ap.error(f"--frames must look like 21,42,84, got {a.frames!r}")
    else:
        frames = [trained, 2 * trained, 4 * trained]
    if frames[0] < R:
        ap.error(f"--frames {frames[0]} is fewer than --ranks {R}")
    return frames


def parse(argv) -> Plan:
    ap = parser()
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    family = FAMILIES[a.family]
    preset_name = a.preset or ("cpu" if a.device == "cpu" else family.gpu_preset)
    if preset_name not in family.presets:
        ap.error(f"--preset {preset_name}: {a.family} has {', '.join(family.presets)}")
    preset = family.presets[preset_name]
    R = a.ranks
    if R < 1:
        ap.error("--ranks must be >= 1")
    if a.device == "cuda" and R > torch.cuda.device_count():
        ap.error(f"--ranks {R}: only {torch.cuda.device_count()} GPUs (one rank per GPU)")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {METHODS}")
    if R == 1:
        methods = [m for m in methods if m not in MULTI]      # engine on 1 rank is engine1
    trained = trained_length(family, preset_name)
    frames = _frames(ap, a, trained, R)
    latent_hw = preset["latent_hw"]
    patch = family.kwargs(preset_name).get("patch_size", 1)
    even = (patch[-1] if isinstance(patch, (tuple, list)) else patch) > 1
    if a.latent:
        try:
            latent_hw = harness.parse_hw(a.latent, even=even)
        except ValueError:
            ap.error(f"--latent must look like 8x8{' (even: patch 2)' if even else ''}, "
                     f"got {a.latent!r}")
    config = default_config(family, preset_name)
    config.update({k: v for k, v in (("window", a.window), ("num_global", a.num_global))
                   if v is not None})
    try:
        vinf.DualScopeConfig(**config)                         # validate before spawning
    except ValueError as e:
        ap.error(str(e))
    base = dict(device=a.device, family=a.family, preset=preset_name, frames=frames,
                steps=a.steps or preset["steps"], seed=a.seed, config=config,
                latent_hw=latent_hw, text_len=preset["text_len"],
                dtype=a.dtype or preset["dtype"], trained=trained,
                out=a.out or harness.out_path(f"throughput-{a.family}-{a.device}.json"))
    return Plan(a, R, methods, base, a.timeout or (900.0 if a.device == "cpu" else 3600.0),
                "nccl" if a.device == "cuda" else "gloo")


# ------------------------------------------------------------------------------ measure
def start(plan: Plan):
    """The report's header on disk (rows follow as they are measured) and on stdout; the ring
    row where ring does not run (on CPU it leaves ``plan.methods``)."""
    a, b, R = plan.args, plan.base, plan.ranks
    family = FAMILIES[b["family"]]
    os.makedirs(os.path.dirname(os.path.abspath(b["out"])), exist_ok=True)
    import diffusers
    guidance = (f"CFG {family.guidance} (batch 2)" if family.guidance else
                f"embedded guidance {HUNYUAN_GUIDANCE} (batch 1)")
    harness.write_json(b["out"], dict(
        benchmark=f"throughput-{b['family']}", **harness.environment(a.device, cpu_model=True),
        diffusers=diffusers.__version__, backend=plan.backend, family=b["family"],
        model_class=family.model_class, preset=b["preset"], model=family.kwargs(b["preset"]),
        latent_hw=list(b["latent_hw"]), text_len=b["text_len"],
        dtype=b["dtype"], trained_frames=b["trained"], frames=b["frames"], steps=b["steps"],
        guidance=guidance,
        scheduler=f"FlowMatchEulerDiscreteScheduler(shift={family.flow_shift})",
        engine_config=b["config"], ranks=R, methods=plan.methods,
        cpu_threads_per_rank=(a.threads or "cores // ranks") if a.device == "cpu" else None,
        rows=[]))
    hw, m = b["latent_hw"], family.kwargs(b["preset"])
    layers = m.get("num_layers", "?")
    print(f"vinf_engine throughput, {b['family']}: {b['preset']} {family.model_class} "
          f"({layers} layers, {m.get('num_attention_heads', '?')} x "
          f"{m.get('attention_head_dim', '?')} heads), latent {hw[0]}x{hw[1]}, "
          f"{'/'.join(map(str, b['frames']))} latent frames (trained: {b['trained']}), "
          f"{b['steps']} steps + 1 warm-up, {guidance}, {b['dtype']}, {a.device} "
          f"({plan.backend}"
          f"{f', {a.threads} thread(s) per rank' if a.device == 'cpu' and a.threads else ''}), "
          f"engine window {b['config']['window']}, "
          f"{b['config']['num_global']} global frames", flush=True)
    if R > 1 and not has_cp_plan(family):
        why = (f"not run: diffusers {diffusers.__version__}'s {family.model_class} has no "
               "_cp_plan (no context parallelism)")
        skipped = [dict(name=LABELS[m].format(R=R), method=m, ranks=R, frames=None, skipped=why)
                   for m in ("ulysses", "ring")]
        plan.methods[:] = [m for m in plan.methods if m not in ("ulysses", "ring")]
    elif "ring" in plan.methods and a.device == "cpu":
        plan.methods.remove("ring")
        skipped = [dict(name=LABELS["ring"].format(R=R), method="ring", ranks=R, frames=None,
                        skipped=RING_ON_CPU)]
    elif "ring" not in plan.methods and R > 1:
        skipped = [dict(name=LABELS["ring"].format(R=R), method="ring", ranks=R, frames=None,
                        skipped=(RING_ON_CPU if a.device == "cpu" else
                                 "not run: opt in with --methods ...,ring (backend _native_flash)"))]
    else:
        skipped = []
    for row in skipped:
        harness.append_row(b["out"], row)
        print_row(row)


def measure_all(plan: Plan):
    """The methods on R ranks in one spawn, those on one rank in another; rank 0 of each adds
    every row to the report as it is measured. Returns ({method: {frames: whole video's
    latents}}, whether a spawn failed)."""
    out, cores, latents, failed = plan.base["out"], os.cpu_count() or 1, {}, False
    groups = [(plan.ranks, [m for m in plan.methods if m in MULTI]),
              (1, [m for m in plan.methods if m not in MULTI])]
    for world, group in groups:
        if not group:
            continue
        threads = None if plan.args.device == "cuda" else (plan.args.threads or max(1, cores // world))
        res, error = harness.spawn(worker, world, dict(plan.base, methods=group, threads=threads),
                                   label=f"{', '.join(group)} on {world} rank(s)",
                                   backend=plan.backend, threads=threads, timeout=plan.timeout)
        if error is not None:
            failed = True
            continue
        for m in group:
            if m in MULTI and m != "engine":          # every rank holds the whole video
                latents[m] = res[0][m]
            else:
                latents[m] = {f: torch.cat([r[m][f] for r in res], dim=2)
                              for f in res[0][m] if all(f in r[m] for r in res)}
        with open(out) as f:
            report = json.load(f)
        add_comparisons(report["rows"], latents)
        harness.write_json(out, report)
    return latents, failed


# ------------------------------------------------------------------------------ report
def finish(plan: Plan, latents) -> dict:
    """The report as measured, with the comparisons, the summary and the notes (written)."""
    out, frames = plan.base["out"], plan.base["frames"]
    with open(out) as f:
        report = json.load(f)
    rows = report["rows"]
    add_comparisons(rows, latents)
    ok = {(r["method"], r["frames"]): r for r in rows if "error" not in r and "skipped" not in r}
    summary = {}
    lo, hi = frames[0], frames[-1]
    for m in ("engine", "engine1"):
        r = ok.get((m, hi))
        if r is not None and "per_frame_vs_1x" in r and lo != hi:
            summary[f"{m}_per_frame_{hi}_vs_{lo}"] = r["per_frame_vs_1x"]
    inv = [r["max_rel_diff_vs_1_rank"] for r in rows if "max_rel_diff_vs_1_rank" in r]
    report["max_rel_diff_R_ranks_vs_1_rank"] = max(inv) if inv else None
    report["summary"] = summary
    cpu = plan.args.device == "cpu"
    report["notes"] = dict(
        ms_per_frame="rank-milliseconds per frame-step: step time x ranks / frames",
        peak_memory=("GPU max_memory_allocated since the warm-up" if not cpu else
                     "peak RSS of the rank's process since the warm-up (/proc/self/clear_refs)"),
        bytes="per rank per step (engine: CommCounters; diffusers: its collectives, wrapped)",
        ulysses_on_cpu=("torch.accelerator.device_count patched to 1 during enable_parallelism; "
                        "attention backend native (SDPA); called with return_dict=False"),
        ulysses_text_mask=("LTX: Ulysses rows run without the text mask (all ones here: the same "
                           "attention), which diffusers 0.42.1's Ulysses rejects"
                           if plan.base["family"] == "ltx" else None),
        ring=RING_ON_CPU if cpu else None)
    harness.write_json(out, report)
    return report


def print_summary(plan: Plan, report: dict):
    rows, R, frames = report["rows"], plan.ranks, plan.base["frames"]
    cuda = plan.args.device == "cuda"
    print()
    print_table(rows, METHODS)
    inv = report["max_rel_diff_R_ranks_vs_1_rank"]
    if inv is not None:
        print(f"\npartition invariance: max over lengths of max |out(R={R}) - out(R=1)| / "
              f"max |out(R=1)| = {inv:.2e} ({plan.base['dtype']})")
    ok = {(r["method"], r["frames"]): r for r in rows if "error" not in r and "skipped" not in r}
    for m, label in (("engine1", "engine 1 rank"), ("engine", f"engine {R} ranks")):
        parts = [f"{f}: {ok[(m, f)]['per_frame_vs_dense']:.2f}x" for f in frames
                 if "per_frame_vs_dense" in ok.get((m, f), {})]
        if parts:
            print(f"{label} per-frame cost vs dense: " + ", ".join(parts))
    for key, v in report["summary"].items():
        m = key.split("_per_frame")[0]
        label = "engine 1 rank" if m == "engine1" else f"engine {R} ranks"
        goal = " (goal <= 1.2x: " + ("met" if v <= 1.2 else "missed") + ")"
        print(f"{label} per-frame cost at {frames[-1]} frames / at {frames[0]}: {v:.2f}x"
              f"{goal if cuda else ''}")
    if not cuda and "ulysses" in plan.methods:
        print("Ulysses on CPU/gloo: torch.accelerator.device_count patched to 1 (diffusers takes "
              "rank % device_count(), 0 on CPU), native SDPA backend, return_dict=False")
    print("ms/frame: step time x ranks / frames (rank-ms per frame-step); vs dense: that over dense's at the same length; "
          "vs 1x: over the same run's at the shortest length")
    print("peak MiB: per rank, " + report["notes"]["peak_memory"] + "; MiB sent/recv and launch "
          "(collectives): per rank per step, the largest rank's")
    print("rel diff: engine R ranks vs engine 1 rank (partition invariance); Ulysses vs dense")
    print(f"wrote {plan.base['out']}")


def main(argv=None):
    plan = parse(argv)
    start(plan)
    latents, failed = measure_all(plan)
    report = finish(plan, latents)
    print_summary(plan, report)
    errors = [r for r in report["rows"] if "error" in r and r["error"] != "out of memory"]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
