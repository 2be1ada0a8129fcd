"""A tiny randomly initialised diffusers DiT + AutoencoderKL, saved with save_pretrained: cfgx's guided
DDIM samples equal DiTPipeline's (same DDIMScheduler, noise and scale), and the 10-class model is
guided with null index 10, not the 1000 DiTPipeline hard-codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.sample import generate

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes)
    with torch.no_grad():  # DiT zero-initialises its modulation and output layers: jitter so outputs vary
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return dit.eval()


def tiny_vae():
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                   sample_size=16).eval()


def save_tiny_pipeline(folder: Path, num_classes: int = 10) -> diffusers.DiTPipeline:
    pipe = diffusers.DiTPipeline(transformer=tiny_dit(num_classes), vae=tiny_vae(),
                                 scheduler=diffusers.DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(folder)
    return pipe


def with_null_at_1000(dit10):
    """The same network with its null row moved to index 1000, the label DiTPipeline sends for "no class"."""
    dit = tiny_dit(1000)
    sd = dit10.state_dict()
    for key in [k for k in sd if k.endswith("embedding_table.weight")]:  # one per block
        table = torch.zeros(1001, sd[key].shape[1])
        table[:10], table[1000] = sd[key][:10], sd[key][10]
        sd[key] = table
    dit.load_state_dict(sd)
    return dit.eval()


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_guided_ddim_equals_dit_pipeline(tmp_path, scale: float) -> None:
    from cfgx.pretrained.dit import load_dit

    pipe = save_tiny_pipeline(tmp_path / "dit")
    pre = load_dit(tmp_path / "dit")
    assert pre.conventions.null_index == 10 and pre.conventions.num_classes == 10 and pre.conventions.learned_sigma
    labels, steps, seed = torch.tensor([0, 3, 9, 5]), 10, 7
    schedule = NoiseSchedule(**pre.conventions.schedule)
    sampler = build_sampler("ddim", schedule, steps, clip_x0=None, spacing="leading")
    calls = []
    net_forward = pre.net.forward
    pre.net.forward = lambda x, t, y: calls.append(y.clone()) or net_forward(x, t, y)
    batch = generate(pre.denoiser(schedule), sampler, pre.shape, labels, scale, seed, 4, torch.device("cpu"))
    ours = (pre.codec.decode(batch.x) / 2 + 0.5).clamp(0, 1)
    if scale != 1.0:
        assert set(calls[0][4:].tolist()) == {10}  # the null branch is the model's own null row

    ref_pipe = diffusers.DiTPipeline(transformer=with_null_at_1000(pipe.transformer), vae=pipe.vae,
                                     scheduler=diffusers.DDIMScheduler.from_pretrained(tmp_path / "dit" / "scheduler"))
    ref_pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed * 1_000_003)  # cfgx's batch 0 generator (cfgx.sample.batch_generator)
    ref = ref_pipe(class_labels=labels.tolist(), guidance_scale=scale, generator=g, num_inference_steps=steps,
                   output_type="pt").images
    assert ours.shape == ref.shape == (4, 3, 16, 16)
    assert ours.std() > 0.01  # images, not a constant
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_dit_pipeline_cannot_guide_a_10_class_model(tmp_path) -> None:
    # Why the null index is read from the model: DiTPipeline sends label 1000 to a table of 11 rows.
    pipe = save_tiny_pipeline(tmp_path / "dit")
    with pytest.raises(IndexError):
        pipe(class_labels=[0], guidance_scale=4.0, num_inference_steps=2, output_type="pt")


def test_guide_first_k_channels_matches_dits_forward_with_cfg(tmp_path) -> None:
    """facebookresearch/DiT guides eps[:, :3] and keeps the rest from the model's output for the cond rows."""
    from cfgx.diffusion.guidance import cfg_eps
    from cfgx.pretrained.dit import load_dit

    save_tiny_pipeline(tmp_path / "dit")
    pre = load_dit(tmp_path / "dit")
    schedule = NoiseSchedule(**pre.conventions.schedule)
    den = pre.denoiser(schedule)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y, s = torch.full((3,), 500), torch.tensor([1, 2, 3]), 4.0
    with torch.no_grad():
        raw = pre.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]))[:, :4]
    c, u = raw.chunk(2)
    want = torch.cat([u[:, :3] + s * (c[:, :3] - u[:, :3]), c[:, 3:]], dim=1)
    full = cfg_eps(den, x, t, y, s)
    den.set_guide_channels(3)
    torch.testing.assert_close(cfg_eps(den, x, t, y, s), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[:, 3:], want[:, 3:])  # it changes what plain CFG does
