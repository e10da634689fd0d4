"""A step cache every rank agrees on: the middle of the denoiser skipped on steps where its
first blocks' output barely changed since the last step that computed it.

First-Block Cache (ParaAttention) and DBCache (cache-dit) decide per process from that
process's activations. Under clip parallelism that would let ranks run different numbers of
blocks: the next exchange hangs, or the clip seams tear. Here the change is measured over
the *whole video*: each rank sums ``|r - r_prev|`` and ``|r_prev|`` over its clip, one
all-reduce of the two numbers gives every rank the same ratio, so every rank skips or
computes together. Each rank caches only its own clip's residual.

    --cache fbc:0.08                       threshold 0.08, the defaults below
    --cache fbc:0.12,front=2,back=1,warmup=3,max_skips=2,taylor

``front``: blocks always computed first, whose residual (output minus input) decides;
``back``: blocks always computed last; ``warmup``: the denoiser's first calls always
computed; ``max_skips``: consecutive skipped calls at most (0: no limit); ``taylor``: the
cached residual extrapolated to first order from the last two computed ones (TaylorSeer).
Off (``None``), the model is untouched: bit for bit the uncached run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

__all__ = ["CacheConfig", "StepCache", "cache_blocks", "cache_unet"]


@dataclass(frozen=True)
class CacheConfig:
    """How a denoiser's step cache decides (see the module's notes); validated here."""

    threshold: float = 0.08
    front: int = 1
    back: int = 0
    warmup: int = 2
    max_skips: int = 3
    taylor: bool = False

    def __post_init__(self):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise ValueError(f"cache threshold must be a number >= 0, got {t!r}")
        for name, lo in (("front", 1), ("back", 0), ("warmup", 0), ("max_skips", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"cache {name} must be an int >= {lo}, got {v!r}")
        if not isinstance(self.taylor, bool):
            raise ValueError(f"cache taylor must be true or false, got {self.taylor!r}")

    @classmethod
    def parse(cls, spec) -> "CacheConfig | None":
        """``None``, a ``CacheConfig``, or ``"fbc:THRESHOLD[,key=value...][,taylor]"``."""
        if spec is None or isinstance(spec, CacheConfig):
            return spec
        if not isinstance(spec, str) or not spec.startswith("fbc:"):
            raise ValueError(f"cache must look like 'fbc:0.08' (first-block cache, its "
                             f"threshold), got {spec!r}")
        head, *rest = spec[4:].split(",")
        kw = {}
        try:
            kw["threshold"] = float(head)
            for item in rest:
                key, sep, value = item.partition("=")
                key = key.strip()
                if key == "taylor" and not sep:
                    kw["taylor"] = True
                elif key in ("front", "back", "warmup", "max_skips") and sep:
                    kw[key] = int(value)
                else:
                    raise ValueError(f"unknown cache option {item!r} (front=, back=, warmup=, "
                                     "max_skips=, taylor)")
        except ValueError as e:
            raise ValueError(f"cache {spec!r}: {e}") from None
        return cls(**kw)

    def spec(self) -> str:
        default = CacheConfig()
        extra = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                 if f.name not in ("threshold", "taylor")
                 and getattr(self, f.name) != getattr(default, f.name)]
        return ",".join([f"fbc:{self.threshold:g}", *extra] + (["taylor"] if self.taylor else []))


class StepCache:
    """One denoiser's cache on one rank: the decisions, every rank's the same, and this
    rank's clip's residuals. ``engine`` is the model's ``ClipParallel`` (its communicator
    all-reduces the change)."""

    def __init__(self, config: CacheConfig, engine, reuse: str = "residual"):
        # reuse: "residual" (the middle's output minus its input, added to this call's
        # input: uniform blocks on one stream) or "output" (the middle's output itself: a
        # UNet's deep features, whose input is another stream)
        self.config, self.engine, self.reuse = config, engine, reuse
        self.force = False                  # this call must compute (set before the front)
        self.calls = 0
        self.skips_in_row = 0
        self.log: list = []     # per call: (change, own change, "computed" | "skipped")
        self.skip = False                   # this call's decision
        self._front_in = self._mid_in = None
        self._front_prev = None             # the front residual at the last computed call
        self._residuals: list = []          # the middle residuals of the last two computed

    # ---------------------------------------------------------------- the front
    # The bookkeeping runs outside any torch.compile graph (``torch.compiler.disable``): read
    # inside one, the cache's state between calls (counters, whether a tensor is held yet)
    # would become guards and recompile the blocks; the graphs see only ``skip``, one graph
    # per way a decision goes.
    @torch.compiler.disable
    def front_input(self, h: torch.Tensor):
        self._front_in = h

    @torch.compiler.disable
    def front_output(self, h: torch.Tensor):
        """Decide, from the front's residual, whether this call skips the middle (a value
        read on the host: outside any graph)."""
        self.calls += 1
        r = (h if self._front_in is None else h - self._front_in).float()
        self._front_in = None
        c = self.config
        warm = (self.calls <= c.warmup or self._front_prev is None or not self._residuals
                or self.force)
        change = own = None
        if self._front_prev is not None and self._front_prev.shape == r.shape:
            change, own = self._change(r, self._front_prev)
        self.skip = (not warm and change is not None and change < c.threshold
                     and (c.max_skips == 0 or self.skips_in_row < c.max_skips))
        if self.skip:
            self.skips_in_row += 1
        else:
            self.skips_in_row = 0
            self._front_prev = r
        self.log.append((change, own, "skipped" if self.skip else "computed"))

    def _change(self, r: torch.Tensor, prev: torch.Tensor) -> tuple:
        """``sum |r - prev| / sum |prev|`` over the whole video: every rank's two sums reach
        every rank on the control plane and are added in rank order on the host, so every
        rank computes the same ratio bit for bit (a device all-reduce need not be bitwise the
        same on every rank, and a ratio within its rounding of the threshold would then split
        the decision: a hang)."""
        mine = tuple(torch.stack([(r - prev).abs().sum(), prev.abs().sum()]).double().tolist())
        rows = self.engine.comm.agree(mine) if self.engine.world_size > 1 else [mine]
        num = den = 0.0
        for a, b in rows:
            num, den = num + a, den + b

        def ratio(a, b):
            return a / b if b > 0 else float("inf")
        # (the whole video's, which decides; this rank's own, for the report only)
        return ratio(num, den), ratio(*mine)

    # ---------------------------------------------------------------- the middle
    @torch.compiler.disable
    def middle_input(self, h: torch.Tensor):
        if not self.skip:
            self._mid_in = h

    @torch.compiler.disable
    def middle_output(self, h: torch.Tensor) -> torch.Tensor:
        """The middle's output: computed (its residual kept), or, skipped, the input plus the
        cached residual (extrapolated to first order with ``taylor``)."""
        if self.skip:
            r = self._residuals[-1]
            if self.config.taylor and len(self._residuals) == 2:
                r = 2 * r - self._residuals[0]
            return r.to(h.dtype) if self.reuse == "output" else h + r.to(h.dtype)
        r = h if self.reuse == "output" else h - self._mid_in
        self._mid_in = None
        self._residuals = (self._residuals + [r])[-2:]
        return h

    # ---------------------------------------------------------------- reports, resume
    def report(self) -> dict:
        """Calls computed and skipped, the whole video's change per call (the decision's),
        this rank's own clip's change (what a per-rank cache would have decided on), the
        decisions."""
        computed = sum(1 for *_, d in self.log if d == "computed")
        return dict(spec=self.config.spec(), threshold=self.config.threshold,
                    calls=len(self.log), computed=computed, skipped=len(self.log) - computed,
                    changes=[None if c is None else round(c, 6) for c, _, _ in self.log],
                    own_changes=[None if c is None else round(c, 6) for _, c, _ in self.log],
                    decisions=[d for *_, d in self.log])

    def state_dict(self) -> dict:
        """What a resumed run needs to make the same decisions (this rank's residuals)."""
        return dict(calls=self.calls, skips_in_row=self.skips_in_row,
                    log=[list(x) for x in self.log], front_prev=self._front_prev,
                    residuals=list(self._residuals), config=asdict(self.config))

    def load_state_dict(self, state: dict):
        if state["config"] != asdict(self.config):
            raise ValueError(f"the checkpoint's step cache was {state['config']}, this run's "
                             f"is {asdict(self.config)}")
        self.calls, self.skips_in_row = state["calls"], state["skips_in_row"]
        self.log = [tuple(x) for x in state["log"]]
        self._front_prev, self._residuals = state["front_prev"], list(state["residuals"])


def cache_blocks(patcher, blocks, cache: StepCache):
    """Install ``cache`` on a model's uniform blocks (each ``forward(hidden_states, ...) ->
    hidden_states``): the first ``front`` always run and decide, the last ``back`` always
    run, the ones between run or are skipped together, every rank alike. Through the
    ``Patcher``: undone with the engine."""
    c, n = cache.config, len(blocks)
    first, last = c.front, n - c.back - 1            # the middle: blocks [first, last]
    if first > last:
        raise ValueError(f"the step cache's front ({c.front}) and back ({c.back}) blocks leave "
                         f"no middle of the model's {n} blocks to skip")

    def make(i):
        def wrap(inner):
            def forward(hidden_states, *args, **kwargs):
                if i == 0:
                    cache.front_input(hidden_states)
                if first <= i <= last:
                    if i == first:
                        cache.middle_input(hidden_states)
                    out = hidden_states if cache.skip else inner(hidden_states, *args, **kwargs)
                    return cache.middle_output(out) if i == last else out
                out = inner(hidden_states, *args, **kwargs)
                if i == first - 1:
                    cache.front_output(out)
                return out
            return forward
        return wrap
    for i, block in enumerate(blocks):
        if i < first or i <= last:
            patcher.replace_method(block, "forward", make(i))


def cache_unet(patcher, model, cache: StepCache):
    """Install ``cache`` on a UNet3D the DeepCache way: its down and up paths meet through
    skip connections, so the middle is no residual on one stream; the deep features are. The
    front (``conv_in``, ``transformer_in``, the first down block) always runs and its output's
    change decides; skipped, the other down blocks, the mid block and every up block but the
    last hand their input through, and the second-to-last up block's output is the last
    computed call's; the last up block then runs on it with the skips the front just made
    (``front=1``, ``back=1``: the last up block). A latent size the UNet pads (not a
    multiple of its down-sampling) always computes."""
    downs, ups = list(model.down_blocks), list(model.up_blocks)
    factor = 2 ** (len(ups) - 1)

    def first_down(inner):
        def forward(hidden_states, *args, **kwargs):
            cache.force = hidden_states.shape[-1] % factor or hidden_states.shape[-2] % factor
            out = inner(hidden_states, *args, **kwargs)
            cache.front_output(out[0])
            return out
        return forward

    def middle_down(block):
        n = len(block.resnets) + (len(block.downsamplers) if block.downsamplers else 0)

        def wrap(inner):
            def forward(hidden_states, *args, **kwargs):
                if cache.skip:           # stand-ins: the up blocks that would read them skip too
                    return hidden_states, (hidden_states,) * n
                return inner(hidden_states, *args, **kwargs)
            return forward
        return wrap

    def passing(inner):
        def forward(hidden_states, *args, **kwargs):
            if cache.skip:
                return hidden_states.pop() if isinstance(hidden_states, list) else hidden_states
            return inner(hidden_states, *args, **kwargs)
        return forward

    def last_middle(inner):
        def forward(hidden_states, *args, **kwargs):
            if cache.skip:
                h = hidden_states.pop() if isinstance(hidden_states, list) else hidden_states
                return cache.middle_output(h)
            return cache.middle_output(inner(hidden_states, *args, **kwargs))
        return forward
    patcher.replace_method(downs[0], "forward", first_down)
    for b in downs[1:]:
        patcher.replace_method(b, "forward", middle_down(b))
    if model.mid_block is not None:
        patcher.replace_method(model.mid_block, "forward", passing)
    for b in ups[:-2]:
        patcher.replace_method(b, "forward", passing)
    patcher.replace_method(ups[-2], "forward", last_middle)
