"""Long-video generation over a diffusers video pipeline, on one rank or many.

    import vinf_engine as vinf
    vinf.generate("models/zeroscope", "a red panda eating bamboo", num_frames=256,
                  out="panda.mp4")                       # on every rank (torchrun) or alone

Every rank loads the pipeline, denoises its own clip of the video with the clip-parallel
denoiser (classifier-free guidance in the batch), draws all noise per global frame from the
seed, decodes its frames, and sends them to rank 0, which encodes the mp4 as they arrive. The
video depends on the seed, the prompts and the settings, not on the number of ranks. What
differs between pipeline families (UNet3D, Wan) lives in ``vinf_engine/pipelines``; the
phases themselves in ``vinf_engine/phases.py``; this module is their order.

Failures are collective: arguments, the model folder, the output path and checkpoints are
checked on every rank and agreed on the CPU control plane before any data moves, so a problem
on one rank raises the same ``GenerationError`` on all of them. A rank that dies or stops
answering mid-run makes the others raise ``GenerationFailed`` when the process group's timeout
expires (or at once, when the transport notices the closed connection).
"""
from __future__ import annotations

from typing import Callable, Sequence

from . import phases
from .errors import GenerationError, GenerationFailed
from .pipelines import inspect_model_dir, load_pipeline
from .prompts import read_prompt_file
from .settings import DEFAULTS, GenerateSettings

__all__ = ["generate", "load_pipeline", "inspect_model_dir", "read_prompt_file", "GenerationError",
           "GenerationFailed", "GenerateSettings", "DEFAULTS"]


def generate(model=None, prompts=None, *, settings: GenerateSettings | None = None,
             device=None, process_group=None, timeout: float | None = None,
             progress: bool = True, callback: Callable | None = None,
             extra_problems: Sequence[str] | None = None, **fields) -> dict:
    """Generate a long video; call on every rank with the same arguments (or alone).

    Parameters
    ----------
    model : str or a loaded pipeline
        A local diffusers pipeline folder (``TextToVideoSDPipeline``: ModelScope, Zeroscope;
        VideoCrafter2 in diffusers layout; ``WanPipeline``: Wan 2.1, Wan 2.2 A14B, Wan 2.2
        TI2V-5B; ``WanImageToVideoPipeline``: Wan 2.1 I2V / FLF2V, Wan 2.2 I2V-A14B), or a
        pipeline already loaded by ``load_pipeline``.
    prompts : str, list of str, or list of (first_frame, str)
        One prompt; several, splitting the video evenly into scenes; or a schedule of scenes
        by global (video) frame. Alternatively ``prompt_file`` (see ``read_prompt_file``).
    settings : GenerateSettings
        Everything else; or give its fields as keyword arguments:
        ``num_frames`` (video frames; Wan: ``4k + 1``), ``out`` (the mp4, rank 0; written to a
        hidden temporary file and renamed on success; an existing file is refused unless
        ``overwrite``; None: no video), ``steps``, ``guidance_scale`` (classifier-free guidance
        when > 1), ``guidance_scale_2`` (Wan 2.2's low-noise expert; default the same),
        ``seed``, ``negative_prompt``, ``config`` (a ``DualScopeConfig``, or a dict overriding
        fields of the family's default), ``height``, ``width``, ``fps`` (VideoCrafter2's
        frame-rate conditioning), ``video_fps`` and ``crf`` (the mp4), ``scheduler`` (a name of
        the family's ``schedulers``; default the pipeline's own), ``dtype`` ("float32",
        "float16", "bfloat16"; default bfloat16 for Wan and float16 for UNet3D on CUDA, float32
        on CPU), ``decode_chunk`` (latent frames the VAE decodes at once), ``save_latents`` (a
        ``.pt`` file for the whole video's final latents), ``checkpoint_dir``,
        ``checkpoint_every``, ``resume`` (a resumed video is identical to an uninterrupted
        one), ``images`` (a path or PIL image for frame 0, or ``(frame, image)`` pairs: held
        at those global video frames), ``last_image``, ``extend`` (an mp4 to continue: the
        output holds its frames, then ``num_frames`` new ones following its last
        ``context_frames``, default 9), ``chunk_mib`` (each layer's working memory, default 1024; see
        ``vinf_engine.parallelize``), ``comm_mode`` ("overlap", exact, the default; "blocking", the published
        pattern, UNet3D only; "stale", the previous step's halos and statistics).
        Unset steps, guidance and video fps take the family's defaults (UNet3D: the paper's
        30, 12, 8; Wan: WanPipeline's 50, 5, 16).
    device : the rank's device (default: its CUDA device, else the CPU).
    process_group, timeout
        The ranks (default: the whole world, or one process) and the control plane's timeout
        in seconds. The data plane's timeout is the process group's own (set at
        ``init_process_group``; the CLI's ``--timeout`` sets both).
    callback : callable(step, timestep, latents)
        Called on every rank after each denoising step.
    extra_problems : list of str
        Problems the caller found with its own inputs (the CLI's), refused with the others.

    Returns
    -------
    dict: the run's report (every rank gets it) plus ``"latents"``, this rank's final latents
    ``(1, C, F_rank, h, w)`` in float32 on the CPU (F_rank latent frames).
    """
    run = phases.open_run(model, prompts, settings, fields, process_group, timeout)
    phases.check_and_agree(run, extra_problems)       # bad input: refused on every rank
    phases.load_model(run, device)
    phases.plan(run)
    phases.resume(run)
    with phases.attached(run):                        # from here a failure is a broken run
        phases.condition(run)
        phases.denoise(run, progress, callback)
        phases.decode_and_write(run)
    return phases.report(run)
