"""The joint text attention layer on its own: a toy projection, an independent dense oracle,
and the function each spawned rank runs (tests/test_joint_attention.py)."""
from __future__ import annotations

import torch

import vinf_engine as vinf
from vinf_engine.comm import ClipComm
from vinf_engine.layers.joint_attention import ClampedGlobalScope, JointText, joint_attention
from vinf_engine.layout import global_frames
from vinf_engine.parallel import ClipParallel

B, T, H, D, C, LT = 2, 3, 2, 4, 8, 5
VALID = (3, 5)              # row 0: two padding tokens, poisoned


def weights(F: int, dtype=torch.float64):
    """The toy attention's projections (the same on every rank) and a video of ``F`` frames:
    its attention input (B, F*T, C) and the text's q, k, v with poisoned padding."""
    g = torch.Generator().manual_seed(7)
    w = {n: torch.randn(C, H * D, generator=g, dtype=dtype) / C ** 0.5 for n in "qkv"}
    w["pos"] = torch.randn(64, H * D, generator=g, dtype=dtype)     # a key offset per position
    x = torch.randn(B, F * T, C, generator=g, dtype=dtype)
    text = [torch.randn(B, LT, H, D, generator=g, dtype=dtype) for _ in range(3)]
    for t in text[1:]:
        t[0, VALID[0]:] = float("nan")                            # padding: never read
    return w, x, text


def keys_at(w, x, positions):
    """Un-rotated keys of ``x`` (B, n*T, C) are ``x Wk``; the toy 'rotation' adds the offset of
    each token's frame position: the layer must pass every frame at its right position."""
    k = (x @ w["k"]).unflatten(2, (H, D))
    pos = torch.tensor(positions).repeat_interleave(T).long()
    return k + w["pos"][pos].unflatten(1, (H, D))


def clip_rank(rank, world, sizes, cfg: dict, t: float, clamp: int | None, dtype=torch.float64):
    """This rank's joint attention outputs for its clip of an F-frame video, with the
    exchanges' bytes by kind."""
    F = sum(sizes)
    w, x, text = weights(F, dtype)
    eng = ClipParallel(vinf.DualScopeConfig(**cfg), ClipComm(), "overlap")
    s = sum(sizes[:rank])
    Fc = sizes[rank]
    eng.begin_step(torch.full((B, 1, Fc, 1, 1), float(rank), dtype=dtype), t)
    eng.scheduler.record = True
    xc = x[:, s * T:(s + Fc) * T]
    pending = eng.start_attention_context(xc.view(B, Fc, T, C))
    q = (xc @ w["q"]).unflatten(2, (H, D))
    k = keys_at(w, xc, range(s, s + Fc))
    v = (xc @ w["v"]).unflatten(2, (H, D))

    def project_kv(y, frames):
        y = y.flatten(1, 2)
        return keys_at(w, y, frames), (y @ w["v"]).unflatten(2, (H, D))

    def unrotated(y):
        y = y.flatten(1, 2)
        return (y @ w["k"]).unflatten(2, (H, D)), (y @ w["v"]).unflatten(2, (H, D))

    def rotate(kk, positions):
        pos = torch.tensor(positions).repeat_interleave(T).long()
        return kk + w["pos"][pos].unflatten(1, (H, D))
    scope_fn = None
    if clamp is not None:
        scope_fn = ClampedGlobalScope(eng, q, range(s, s + Fc), T, clamp, unrotated, rotate,
                                      D ** -0.5)
    jt = JointText(*text, valid=VALID)
    video, txt = joint_attention(eng, pending, q, k, v, project_kv, jt, scale=D ** -0.5,
                                 tokens_per_frame=T, global_scope=scope_fn)
    log = eng.scheduler.take_log()
    return dict(video=video, text=txt, bytes={e["kind"]: e["bytes_received"] for e in log},
                biases=(eng.local_bias, eng.global_bias))


def oracle(F, cfg: dict, local_bias, global_bias, clamp, dtype=torch.float64):
    """The dense joint attention of the whole video, written from the definition: per query
    the list of keys it sees and their logit biases, one softmax."""
    w, x, (qt, kt, vt) = weights(F, dtype)
    q = (x @ w["q"]).unflatten(2, (H, D))
    v = (x @ w["v"]).unflatten(2, (H, D))
    win, G = min(cfg["window"], F - 1), global_frames(F, cfg["num_global"])
    text_bias = max(local_bias, global_bias)
    video = torch.empty_like(q)
    for b in range(B):
        n = VALID[b]
        for a in range(F):
            ks, vs, bias = [], [], []
            for f in range(max(0, a - win), min(F, a + win + 1)):
                ks.append(keys_at(w, x[b:b + 1, f * T:(f + 1) * T], [f])[0])
                vs.append(v[b, f * T:(f + 1) * T])
                bias += [local_bias] * T
            for g_ in G:
                p = g_ if clamp is None else a - max(-clamp, min(clamp, a - g_))
                ks.append(keys_at(w, x[b:b + 1, g_ * T:(g_ + 1) * T], [p])[0])
                vs.append(v[b, g_ * T:(g_ + 1) * T])
                bias += [global_bias] * T
            ks.append(kt[b, :n])
            vs.append(vt[b, :n])
            bias += [text_bias] * n
            video[b, a * T:(a + 1) * T] = _softmax_attend(q[b, a * T:(a + 1) * T], ks, vs, bias)
    kv = keys_at(w, x, [f for f in range(F)])
    text = torch.empty_like(qt)
    for b in range(B):
        n = VALID[b]
        text[b] = _softmax_attend(qt[b], [kv[b], kt[b, :n]], [v[b], vt[b, :n]], [0.0] * (F * T + n))
    return video, text


def _softmax_attend(q, ks, vs, bias):
    k, v = torch.cat(ks), torch.cat(vs)                   # (N, H, D)
    s = torch.einsum("lhd,nhd->hln", q, k) / D ** 0.5 + torch.tensor(bias, dtype=q.dtype)
    return torch.einsum("hln,nhd->lhd", s.softmax(-1), v)


def flat_bytes_rank(rank, world):
    """Bytes this rank receives per joint attention as the video grows (fixed config)."""
    out = {}
    cfg = dict(window=1, num_global=2, phase_t=500, phase_bias=1.0)
    for F in (6, 12, 24):
        out[F] = clip_rank(rank, world, (F // 2, F // 2), cfg, 900, None, torch.float32)["bytes"]
    return out
