"""Per-rank work of the HunyuanVideo 1.5 VAE decode, before (each rank decodes the latent
prefix up to its clip's end with the stock ``vae.decode``) and now (``hunyuan15_vae``: the
prefix only through the mid block's attention keys, the rest over the clip plus its warm-up).

    python bench/hunyuan15_vae_split.py                       # released VAE, 480p, 3 ranks
    python bench/hunyuan15_vae_split.py --ranks 4 --latent-frames 31 62 --height 720 --width 1280

The VAE is built on the meta device from its default config (the released layout: channels
(128, 256, 512, 1024, 1024), two resnets per block, 16x spatial, 4x temporal), so nothing is
loaded or computed: the figures are frame counts and multiply-adds from the module structure
(``hunyuan15_vae.decode_plan`` / ``decode_work``; tests/test_hunyuan15_vae.py checks the
counts against the frames the stock modules receive). Per rank: its latent clip, the video
frames it keeps, latent frames run through the prefix (conv_in, first mid resnet, keys and
values), video-rate frames into the last up block (full size, 128 channels), and its share of
the whole video's decode work (1.0 = the whole decode).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--latent-frames", type=int, nargs="+", default=[31, 93])
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=848)
    a = ap.parse_args(argv)

    import torch
    from diffusers import AutoencoderKLHunyuanVideo15
    from vinf_engine.hunyuan15_vae import decode_work, video_frames_of
    from vinf_engine.layout import ClipLayout
    with torch.device("meta"):
        vae = AutoencoderKLHunyuanVideo15()
    ks = vae.spatial_compression_ratio
    h, w = a.height // ks, a.width // ks

    def total(d):
        return d["prefix"] + d["attention"] + d["window"]
    for L in a.latent_frames:
        lay = ClipLayout(L, a.ranks)
        whole = decode_work(vae, 0, L, h, w)
        print(f"\n{L} latent frames = {1 + 4 * (L - 1)} video frames at {a.height}x{a.width}, "
              f"{a.ranks} ranks; whole decode {total(whole) / 1e12:.0f} TMAC "
              f"(prefix {whole['prefix'] / total(whole):.2%}, attention "
              f"{whole['attention'] / total(whole):.2%})")
        print("rank  clip      video kept/of   prefix (latent)  last up block in   work share "
              "(before -> now)")
        for r in range(a.ranks):
            s, e = lay.start(r), lay.end(r)
            before, now = decode_work(vae, 0, e, h, w), decode_work(vae, s, e, h, w)
            vf = video_frames_of(range(s, e))
            last = now["frames"]["up_blocks.4.resnets.0"]
            print(f"{r:>4}  [{s:>3},{e:>3})  {len(vf):>5} of {vf.stop:<5} "
                  f"{now['frames']['conv_in']:>6}        "
                  f"{last:>5} (was {before['frames']['up_blocks.4.resnets.0']:>4})   "
                  f"{total(before) / total(whole):.3f} -> {total(now) / total(whole):.3f}")


if __name__ == "__main__":
    main()
