"""vinf_engine: long videos from short-clip video diffusion models, split across GPUs by time.

    import vinf_engine as vinf
    model = vinf.parallelize(unet, vinf.DualScopeConfig(window=8, num_global=16))
    out = model(my_clip, t, encoder_hidden_states=emb).sample   # on every rank, its own clip
"""
from . import ops
from .comm import ClipComm, CommCounters
from .config import DualScopeConfig
from .layout import ClipLayout, global_frames
from .noise import initial_noise, step_noise
from .dropin import parallelize_pipe, unparallelize_pipe
from .parallel import ClipParallel, parallelize, unparallelize
from .pipeline import GenerationError, GenerationFailed, generate, load_pipeline
from .settings import GenerateSettings

__version__ = "0.1.0"

__all__ = ["ops", "DualScopeConfig", "ClipLayout", "global_frames", "ClipComm", "CommCounters",
           "ClipParallel", "parallelize", "unparallelize", "parallelize_pipe",
           "unparallelize_pipe", "initial_noise", "step_noise",
           "generate", "load_pipeline", "GenerateSettings", "GenerationError", "GenerationFailed"]
