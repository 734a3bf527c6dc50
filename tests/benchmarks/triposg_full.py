"""TripoSG at full width with random weights (the reference's default sizes: DiT 2048 wide × 21 layers, VAE
decoder 1024 × 16, DINOv2-L/14), one image, on the CPU: seconds per DiT step with guidance (the DiT on two
batches), the VAE decode and our surface at 256 and 512, peak RSS. Prints one JSON object.

    python tests/benchmarks/triposg_full.py [--threads 2] [--steps 1] [--resolutions 256 512]

Random weights draw no object, so the decoder is given one (as the tiny fixture is): a direction of its query
stream follows cos x + cos y + cos z, read by its output, so the surface is a rounded blob filling most of the
box with the random layers' bumps on it; its area, which sets the surface's cost, is then an object's.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend import surface  # noqa: E402
from backend.models import triposg  # noqa: E402
from backend.models.rectified_flow import FlowConfig  # noqa: E402


def build() -> triposg.TripoSG:
    cfg = triposg.TripoSGConfig(triposg.DiTConfig(), triposg.VAEConfig(), triposg.Dinov2Config(),
                                triposg.ImagePrep(), FlowConfig(shift=1.0))
    with torch.device("meta"):
        model = triposg.TripoSG(cfg)
    model = model.to_empty(device="cpu").requires_grad_(False).eval()
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("norm" in name or "lambda1" in name):
            p.fill_(1.0) if name.endswith(("weight", "lambda1")) else p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=g)
    model.vae.embedder = triposg.FourierEmbedding(cfg.vae.embed_frequency, cfg.vae.embed_include_pi)
    d, n = model.vae.decoder, cfg.vae.embed_frequency
    u = torch.randn(d.proj_query.weight.shape[0], generator=g)
    u = (u - u.mean()) / (u - u.mean()).norm()
    cos_1 = [3 + 3 * n + i * n for i in range(3)]  # cos(x), cos(y), cos(z): frequency 1
    d.proj_query.weight[:, cos_1] += 40.0 * u[:, None]
    d.proj_out.weight.copy_(-40.0 * u[None])
    d.proj_out.bias.fill_(0.0)
    d.proj_query.bias.sub_(40.0 * 2.75 * u)  # the surface where cos x + cos y + cos z = 2.75 (radius ~0.72)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "torch": torch.__version__, "device": "cpu", "precision": "fp32"}
    t = time.perf_counter()
    model = build()
    out["build_s"] = round(time.perf_counter() - t, 1)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    image = np.full((512, 512, 3), 255, np.uint8)
    image[100:400, 150:350] = (180, 90, 40)
    with torch.no_grad():
        t = time.perf_counter()
        tokens = model.encode(image)
        out["encode_s"] = round(time.perf_counter() - t, 2)
        t0 = time.perf_counter()
        times = []
        latents = model.latents(tokens, args.steps, 7.0, 42, lambda i, n: times.append(time.perf_counter()))
        steps = np.diff([t0] + times)
        out["dit_step_cfg_s"] = round(float(np.mean(steps)), 2)
        out["dit_50_steps_cfg_s"] = round(50 * float(np.mean(steps)), 1)
        for r in args.resolutions:
            t = time.perf_counter()
            field = model.field(latents)
            context_s = time.perf_counter() - t
            stats = {}
            t = time.perf_counter()
            v, f = surface.marching_cubes(field, r, 0.0, stats=stats)
            surf_s = time.perf_counter() - t
            out[f"surface_{r}"] = {"decode_context_s": round(context_s, 2), "surface_s": round(surf_s, 1),
                                   "evaluations": stats["evaluations"], "cells": stats["cells"],
                                   "faces": int(len(f)), "query_chunk": field.chunk,
                                   "share_of_50_steps": round((context_s + surf_s) / out["dit_50_steps_cfg_s"], 3)}
            print(json.dumps(out), file=sys.stderr, flush=True)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
