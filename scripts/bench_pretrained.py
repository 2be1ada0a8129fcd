"""cfgx's guided DDIM sampling of a diffusers DiT vs DiTPipeline's, side by side in one process.

The same tiny randomly initialised DiT (1000 classes, so DiTPipeline's hard-coded null label 1000 is its
null row) and AutoencoderKL, saved with save_pretrained and loaded by cfgx.pretrained.dit; equal steps,
scale, batch and noise; decode included on both sides. Runs alternate (cfgx, pipeline, cfgx, ...) and the
best of ``--repeats`` is kept, so load from other processes on a shared machine hits both alike.
Prints img/s of each and the ratio cfgx / pipeline (>= 1.0: cfgx at least as fast).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfgx.diffusion.samplers import build_sampler  # noqa: E402
from cfgx.diffusion.schedule import NoiseSchedule  # noqa: E402
from cfgx.pretrained.dit import load_dit  # noqa: E402
from cfgx.sample import generate  # noqa: E402


def build(folder: Path, hidden_heads: int, layers: int, latent: int):
    # why: diffusers is the [pretrained] extra; the benchmark needs it only here
    import diffusers

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=hidden_heads, attention_head_dim=32, in_channels=4,
                                          out_channels=8, num_layers=layers, sample_size=latent, patch_size=2,
                                          num_embeds_ada_norm=1000)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                  sample_size=2 * latent)
    pipe = diffusers.DiTPipeline(transformer=dit.eval(), vae=vae.eval(),
                                 scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build(Path(tmp) / "dit", 4, args.layers, args.latent).to(dev)
        pre = load_dit(Path(tmp) / "dit", dev)
    schedule = NoiseSchedule(**pre.conventions.schedule)
    sampler = build_sampler("ddim", schedule, args.steps, clip_x0=None, spacing="leading")
    den = pre.denoiser(schedule).to(dev)
    labels = torch.arange(args.batch) % 1000

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run_cfgx() -> torch.Tensor:
        x = generate(den, sampler, pre.shape, labels, args.scale, 0, args.batch, dev).x
        return den.decode(x)

    @torch.no_grad()
    def run_pipe() -> torch.Tensor:
        g = torch.Generator(device=dev).manual_seed(0)
        return pipe(class_labels=labels.tolist(), guidance_scale=args.scale, generator=g,
                    num_inference_steps=args.steps, output_type="pt").images

    best = {"cfgx": float("inf"), "pipeline": float("inf")}
    run_cfgx(), run_pipe()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("cfgx", run_cfgx), ("pipeline", run_pipe)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    ips = {k: args.batch / v for k, v in best.items()}
    out = {"device": str(dev), "threads": torch.get_num_threads(), "batch": args.batch, "steps": args.steps,
           "scale": args.scale, "layers": args.layers, "latent": args.latent,
           "cfgx_img_per_s": round(ips["cfgx"], 2), "pipeline_img_per_s": round(ips["pipeline"], 2),
           "ratio_cfgx_over_pipeline": round(ips["cfgx"] / ips["pipeline"], 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
