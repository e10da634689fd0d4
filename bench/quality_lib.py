"""Quality you can measure: a procedural video set whose rule is known, and figures that check it.

The data: 1-3 objects of distinct colours (red, green, blue, yellow) and shapes (square, disc,
triangle) move at constant velocity over a plain background whose hue drifts slowly, and
bounce off the walls (elastic reflection of the continuous path). A video is a ``Scene``,
deterministic from its seed; ``render`` draws any frame range of it (anti-aliased), ``truth`` gives the objects' centroids, and ``label`` its text, e.g.
"red square and blue disc".

The figures (``video_figures``) follow from that rule, never from a learned judge:

- *seam jump*: the mean absolute change between consecutive frames at clip boundaries over
  the same inside clips (1.0: no seam);
- *objects ok*: the share of frames holding exactly the prompt's colours, each once;
- *rule error*: per tracked object and frame triple away from walls and other objects,
  ``|p[t+1] - 2 p[t] + p[t-1]|`` (velocity constant between bounces) plus how far the speed
  ``|p[t] - p[t-1]|`` lies outside the data's range (px/frame); inside clips and across seams;
- *motion*: the tracked objects' mean speed over the data's mean speed (a frozen video: 0).

Imported by ``bench/quality.py``, ``bench/quality_train.py`` and ``tests/test_quality.py``.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

__all__ = ["SIZE", "FRAMES", "COLOURS", "SHAPES", "SPEED", "Obj", "Scene", "sample_scene",
           "scene_for_label", "render", "truth", "label", "all_labels", "colours_of",
           "Tracks", "track", "frame_change", "seam_boundaries", "seam_ratio", "rule_error",
           "video_figures", "DATA_SPEED"]

SIZE = 16            # pixels per side
FRAMES = 16          # the models' trained length (frames of one training clip)
R = 2.2              # object half-size in pixels (a square is 4.4 px wide)
SPEED = (0.5, 1.0)   # px per frame: every object's speed is drawn from this range
COLOURS = {"red": (0.90, 0.15, 0.15), "green": (0.10, 0.80, 0.20),
           "blue": (0.20, 0.30, 0.95), "yellow": (0.95, 0.85, 0.15)}
SHAPES = ("square", "disc", "triangle")
BG_SV = (0.30, 0.35)           # background saturation and value: dark, greyish, never an object
BG_DRIFT = (0.004, 0.012)      # background hue change per frame (either sign)
# Tracking (``track``): a pixel off the line from the background to a colour by RHO (RGB
# distance, [0, 1] units) counts nothing toward it; palette colours lie >= 0.5 off each other's.
RHO = 0.20
MIN_AREA = 5.0                 # px of weight below which an object is absent (a square: 19)
# Frame triples are judged only where the object is this far from every wall (its largest
# extent, 1.45 R for the triangle's apex, plus the largest step, plus tracking slack) and
# from every other object (no occlusion).
WALL_MARGIN = 1.45 * R + SPEED[1] + 0.4
NEAR_OBJECT = 2.6 * R


@dataclass(frozen=True)
class Obj:
    """One object: its colour and shape names, centroid at frame 0 and velocity (px/frame)."""

    colour: str
    shape: str
    p0: tuple
    v: tuple


@dataclass(frozen=True)
class Scene:
    """One video: its objects and its background (hue at frame 0, hue change per frame)."""

    objects: tuple
    hue0: float
    drift: float
    size: int = SIZE


def _extent(shape: str) -> tuple:
    """(left, right, top, bottom) extent of a shape around its centroid, in units of R."""
    if shape == "triangle":            # apex up; centroid a third of the height above the base
        return (1.2, 1.2, 1.45, 0.75)
    if shape == "disc":
        return (1.13, 1.13, 1.13, 1.13)
    return (1.0, 1.0, 1.0, 1.0)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None,
                 colours: tuple | None = None, shapes: tuple | None = None) -> Scene:
    """A random scene: ``n_objects`` (default 1-3) distinct colours, random shapes, positions
    inside the walls, speeds in ``SPEED`` in random directions, a random drifting background."""
    n = int(rng.integers(1, 4)) if n_objects is None and colours is None else (
        len(colours) if colours is not None else n_objects)
    names = list(COLOURS)
    cols = colours if colours is not None else tuple(
        names[i] for i in sorted(rng.choice(len(names), n, replace=False)))
    objs = []
    for i, c in enumerate(cols):
        shape = shapes[i] if shapes is not None else SHAPES[int(rng.integers(len(SHAPES)))]
        l, r, t, b = _extent(shape)
        x = rng.uniform(l * R, SIZE - r * R)
        y = rng.uniform(t * R, SIZE - b * R)
        speed, ang = rng.uniform(*SPEED), rng.uniform(0, 2 * np.pi)
        objs.append(Obj(c, shape, (float(x), float(y)),
                        (float(speed * np.cos(ang)), float(speed * np.sin(ang)))))
    drift = rng.uniform(*BG_DRIFT) * (1 if rng.random() < 0.5 else -1)
    return Scene(tuple(objs), float(rng.random()), float(drift))


def label(scene: Scene) -> str:
    """The scene's text: objects in palette order, e.g. "red square and blue disc"."""
    parts = [f"{o.colour} {o.shape}" for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def all_labels() -> list:
    """Every label the data can have (174: 1-3 distinct colours in palette order, any shapes)."""
    import itertools
    names, out = list(COLOURS), []
    for n in (1, 2, 3):
        for cols in itertools.combinations(names, n):
            for shapes in itertools.product(SHAPES, repeat=n):
                out.append(" and ".join(f"{c} {s}" for c, s in zip(cols, shapes)) if n < 3 else
                           f"{cols[0]} {shapes[0]}, {cols[1]} {shapes[1]} and {cols[2]} {shapes[2]}")
    return out


def colours_of(text: str) -> tuple:
    """The colours a label names, in palette order."""
    words = text.replace(",", " ").split()
    return tuple(c for c in COLOURS if c in words)


def scene_for_label(text: str, seed: int) -> Scene:
    """A scene of the objects ``text`` names, positions and motion drawn from ``seed``."""
    words = text.replace(",", " ").replace(" and ", " ").split()
    pairs = list(zip(words[0::2], words[1::2]))
    rng = np.random.default_rng(seed)
    return sample_scene(rng, colours=tuple(c for c, _ in pairs), shapes=tuple(s for _, s in pairs))


def _bounce(p0: float, v: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The reflected path ``p0 + v t`` between walls ``lo`` and ``hi``: a triangle wave."""
    span = hi - lo
    u = np.mod(p0 - lo + v * t, 2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


def truth(scene: Scene, frames: range) -> np.ndarray:
    """Object centroids at ``frames``: (len(frames), n_objects, 2) as (x, y) in pixels."""
    t = np.arange(frames.start, frames.stop, dtype=np.float64)
    out = np.empty((len(t), len(scene.objects), 2))
    for i, o in enumerate(scene.objects):
        l, r, top, b = _extent(o.shape)
        out[:, i, 0] = _bounce(o.p0[0], o.v[0], t, l * R, scene.size - r * R)
        out[:, i, 1] = _bounce(o.p0[1], o.v[1], t, top * R, scene.size - b * R)
    return out


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] of the pixels whose centres lie at ``dx, dy`` (pixels) from a shape's
    centroid. Anti-aliased by signed distance (a one-pixel ramp across every edge), so that
    the coverage, and the tracked centroid, move smoothly with the shape; the square's is its
    exact pixel coverage."""
    if shape == "square":
        return (np.clip(R + 0.5 - np.abs(dx), 0, 1) * np.clip(R + 0.5 - np.abs(dy), 0, 1))
    if shape == "disc":
        return np.clip(1.13 * R + 0.5 - np.hypot(dx, dy), 0, 1)
    # Triangle, apex up: apex at y = -1.45 R, base at y = 0.75 R, half-width 1.2 R at the base:
    # the largest of the three edges' signed distances.
    h, half = 2.2 * R, 1.2 * R
    n = np.hypot(h, half)
    side = (h * np.abs(dx) - half * (dy + 1.45 * R)) / n        # both slanted edges
    base = dy - 0.75 * R
    return np.clip(0.5 - np.maximum(side, base), 0, 1)


def render(scene: Scene, frames: range) -> np.ndarray:
    """The scene's frames ``frames``: (len(frames), S, S, 3) float32 RGB in [0, 1]."""
    S = scene.size
    gx, gy = np.meshgrid(np.arange(S) + 0.5, np.arange(S) + 0.5)
    pos = truth(scene, frames)
    out = np.empty((len(frames), S, S, 3), dtype=np.float32)
    for k, f in enumerate(frames):
        bg = colorsys.hsv_to_rgb((scene.hue0 + scene.drift * f) % 1.0, *BG_SV)
        img = np.broadcast_to(np.asarray(bg, np.float64), (S, S, 3)).copy()
        for i, o in enumerate(scene.objects):
            alpha = _coverage(o.shape, gx - pos[k, i, 0], gy - pos[k, i, 1])[..., None]
            img = img * (1 - alpha) + np.asarray(COLOURS[o.colour]) * alpha
        out[k] = img
    return out


def _data_mean_speed(n: int, seed: int = 12345) -> float:
    """The data's mean centroid speed (px/frame), measured on ``n`` sampled scenes' truth."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(n):
        p = truth(sample_scene(rng), range(FRAMES))
        steps.append(np.linalg.norm(np.diff(p, axis=0), axis=-1).ravel())
    return float(np.concatenate(steps).mean())


DATA_SPEED = _data_mean_speed(400)


# ==================================================================== tracking and figures
@dataclass
class Tracks:
    """Per palette colour (in ``COLOURS`` order) and frame: weight area (F, 4), centroid
    (F, 4, 2) as (x, y) pixels (NaN where absent) and presence (F, 4) bool."""

    area: np.ndarray
    centroid: np.ndarray
    present: np.ndarray


def track(video: np.ndarray) -> Tracks:
    """Track every palette colour in ``video`` (F, H, W, 3), uint8 or float in [0, 1].

    Each pixel is unmixed against the frame's background (its median colour: the background
    covers most of a frame): its coverage by colour ``c`` is the projection ``a`` of
    ``pixel - bg`` on ``c - bg``, in [0, 1], weighted down by the distance of the pixel from
    that line (``1 - residual / RHO``), so that an anti-aliased edge counts by its coverage
    (unbiased sub-pixel centroids) and another colour counts nothing."""
    v = video.astype(np.float32) / (255.0 if video.dtype == np.uint8 else 1.0)
    F, H, W, _ = v.shape
    bg = np.median(v.reshape(F, H * W, 3), axis=1)                          # (F, 3)
    pal = np.asarray(list(COLOURS.values()), np.float32)                    # (4, 3)
    x = (v - bg[:, None, None, :])[:, :, :, None, :]                        # (F, H, W, 1, 3)
    dirs = (pal[None] - bg[:, None])[:, None, None]                          # (F, 1, 1, 4, 3)
    a = (x * dirs).sum(-1) / (dirs * dirs).sum(-1)                          # (F, H, W, 4)
    resid = np.linalg.norm(x - a[..., None] * dirs, axis=-1)
    w = np.clip(a, 0.0, 1.0) * np.clip(1.0 - resid / RHO, 0.0, 1.0)
    area = w.sum(axis=(1, 2))                                               # (F, 4)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (w * xs[None, :, :, None]).sum(axis=(1, 2)) / area
        cy = (w * ys[None, :, :, None]).sum(axis=(1, 2)) / area
    present = area >= MIN_AREA
    cen = np.stack([cx, cy], axis=-1)
    cen[~present] = np.nan
    return Tracks(area, cen, present)


def frame_change(video: np.ndarray) -> np.ndarray:
    """Mean absolute change between consecutive frames: (F-1,), entry ``t-1`` for ``t-1 -> t``."""
    v = video.astype(np.float32) / (255.0 if video.dtype == np.uint8 else 1.0)
    return np.abs(np.diff(v, axis=0)).mean(axis=(1, 2, 3))


def seam_boundaries(num_frames: int, ranks: int) -> list:
    """The first frame of every clip but the first when ``ranks`` ranks split ``num_frames``."""
    from vinf_engine import ClipLayout
    layout = ClipLayout(num_frames, ranks)
    return [layout.start(r) for r in range(1, ranks)]


def seam_ratio(change: np.ndarray, boundaries) -> float:
    """Mean frame change across ``boundaries`` over the mean change inside clips.

    ``change``: (F-1,) from ``frame_change``. NaN if there is no boundary or nothing inside;
    a frozen video (no change anywhere) gives NaN too: it has no seam and no motion."""
    at = np.zeros(len(change), bool)
    for b in boundaries:
        at[b - 1] = True
    if not at.any() or at.all():
        return float("nan")
    inside = change[~at].mean()
    return float(change[at].mean() / inside) if inside > 0 else float("nan")


def rule_error(tracks: Tracks, colours: tuple, size: int = SIZE) -> tuple:
    """How far the tracked objects of the prompt's ``colours`` break the motion rule.

    Returns
    -------
    acc : (F, n, 2) float
        ``|p[t+1] - 2 p[t] + p[t-1]|`` per object and axis (px/frame^2): the change of
        velocity, 0 between bounces. NaN unless the object is tracked at ``t-1, t, t+1``, on
        that axis at least ``WALL_MARGIN`` from both walls (no bounce in the triple) and at
        least ``NEAR_OBJECT`` from every other object (no occlusion).
    off : (F, n) float
        For the step ``t-1 -> t``: how far the speed ``|p[t] - p[t-1]|`` lies outside the
        data's range ``SPEED`` (px/frame). NaN unless both frames are judged on both axes."""
    idx = [list(COLOURS).index(c) for c in colours]
    cen = tracks.centroid
    F = cen.shape[0]
    acc = np.full((F, len(idx), 2), np.nan)
    off = np.full((F, len(idx)), np.nan)
    for k, i in enumerate(idx):
        p = cen[:, i]                                                   # (F, 2)
        with np.errstate(invalid="ignore"):
            ok = (p >= WALL_MARGIN) & (p <= size - WALL_MARGIN)         # (F, 2)
            for j in range(len(COLOURS)):
                if j != i:                                      # an absent other (NaN) is fine
                    ok &= ~(np.linalg.norm(cen[:, j] - p, axis=-1) < NEAR_OBJECT)[:, None]
        if F >= 3:
            trip = ok[:-2] & ok[1:-1] & ok[2:]
            acc[1:-1, k] = np.where(trip, np.abs(p[2:] - 2 * p[1:-1] + p[:-2]), np.nan)
        if F >= 2:
            sp = np.linalg.norm(np.diff(p, axis=0), axis=-1)
            pair = ok[:-1].all(-1) & ok[1:].all(-1)
            dist = np.maximum(SPEED[0] - sp, 0) + np.maximum(sp - SPEED[1], 0)
            off[1:, k] = np.where(pair, dist, np.nan)
    return acc, off


def _rule(acc: np.ndarray, off: np.ndarray) -> float:
    """Mean velocity change plus mean speed off range, over what was judged (a part with
    nothing judged counts 0; NaN if neither has anything)."""
    parts = [float(x[np.isfinite(x)].mean()) for x in (acc, off) if np.isfinite(x).any()]
    return sum(parts) if parts else float("nan")


def _objects_ok(tracks: Tracks, colours: tuple) -> np.ndarray:
    """(F,) bool: exactly the prompt's colours are present."""
    want = np.array([c in colours for c in COLOURS])
    return np.all(tracks.present == want[None], axis=1)


def video_figures(video: np.ndarray, colours: tuple, seam_sets: dict) -> dict:
    """Every figure of one video.

    Parameters
    ----------
    video : (F, H, W, 3) uint8 or float in [0, 1]
    colours : the prompt's colours (``colours_of(prompt)``)
    seam_sets : {name: boundaries}: the seams to score, e.g. {"2": [F // 2], ...}

    Returns
    -------
    dict: ``seam_<name>`` (seam jump ratio), ``objects_ok`` (share of frames), ``obj_seam_ok``
    (share of the union of seams whose frames on both sides are ok), ``rule_err`` (mean
    velocity change plus mean speed off the data's range, from ``rule_error``, px/frame),
    ``rule_err_seam`` (the same at the union of seams: the velocity changes at frames
    ``b-1`` and ``b`` and the step ``b-1 -> b``), ``judged`` (object-axis triples judged),
    ``motion`` (mean tracked speed of the prompt's objects / ``DATA_SPEED``; 0 if none)."""
    change = frame_change(video)
    tr = track(video)
    out = {f"seam_{k}": seam_ratio(change, b) for k, b in seam_sets.items()}
    ok = _objects_ok(tr, colours)
    out["objects_ok"] = float(ok.mean())
    seams = sorted({b for bs in seam_sets.values() for b in bs})
    out["obj_seam_ok"] = float(np.mean([ok[b - 1] and ok[b] for b in seams])) if seams else float("nan")
    acc, off = rule_error(tr, colours, video.shape[2])
    out["rule_err"] = _rule(acc, off)
    near = np.zeros(len(acc), bool)
    for b in seams:                  # velocity changes at b-1 and b, the step b-1 -> b
        near[max(b - 1, 0):b + 1] = True
    step = np.zeros(len(acc), bool)
    step[seams] = True
    out["rule_err_seam"] = _rule(acc[near], off[step])
    out["judged"] = int(np.isfinite(acc).sum())
    idx = [list(COLOURS).index(c) for c in colours]
    with np.errstate(all="ignore"):
        sp = np.linalg.norm(np.diff(tr.centroid[:, idx], axis=0), axis=-1)
        out["motion"] = float(np.nanmean(sp) / DATA_SPEED) if np.isfinite(sp).any() else 0.0
    return out
