"""Loading pretrained weights safely: .pt, .bin and .safetensors copies of one state dict give identical
outputs; an official facebookresearch/DiT checkpoint maps onto diffusers' DiT; a crafted pickle is refused in
one line and its payload never runs."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from cfgx.errors import CfgxError

diffusers = pytest.importorskip("diffusers")
from test_pretrained_dit import tiny_dit  # noqa: E402

from cfgx.pretrained.weights import load_dit_transformer, read_state_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _probe(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, model.config.in_channels, model.config.sample_size, model.config.sample_size, generator=g)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([0, 400, 999]), class_labels=torch.tensor([1, 2, 10])).sample


def test_pt_bin_and_safetensors_copies_give_identical_outputs(tmp_path) -> None:
    dit = tiny_dit(10)
    dit.save_pretrained(tmp_path / "st")  # config.json + diffusion_pytorch_model.safetensors
    for suffix in (".bin", ".pt"):
        d = tmp_path / suffix[1:]
        d.mkdir()
        shutil.copy(tmp_path / "st" / "config.json", d)
        torch.save(dit.state_dict(), d / f"diffusion_pytorch_model{suffix}")
    outs = [_probe(load_dit_transformer(tmp_path / name)) for name in ("st", "bin", "pt")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(outs[0], _probe(dit))


def _as_official(dit) -> dict[str, torch.Tensor]:
    """diffusers DiT weights written in facebookresearch/DiT's layout (the keys of its released .pt files)."""
    sd = dit.state_dict()
    b0 = "transformer_blocks.0.norm1.emb."
    hidden = sd["pos_embed.proj.weight"].shape[0]
    n = (dit.config.sample_size // dit.config.patch_size) ** 2
    out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
           "pos_embed": torch.zeros(1, n, hidden),
           "y_embedder.embedding_table.weight": sd[b0 + "class_embedder.embedding_table.weight"],
           "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
           "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
           "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"]}
    for kind in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{kind}"] = sd[b0 + f"timestep_embedder.linear_1.{kind}"]
        out[f"t_embedder.mlp.2.{kind}"] = sd[b0 + f"timestep_embedder.linear_2.{kind}"]
        for i in range(dit.config.num_layers):
            d = f"transformer_blocks.{i}."
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[d + f"attn1.to_{c}.{kind}"] for c in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[d + f"attn1.to_out.0.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[d + f"ff.net.0.proj.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[d + f"ff.net.2.{kind}"]
            out[f"blocks.{i}.adaLN_modulation.1.{kind}"] = sd[d + f"norm1.linear.{kind}"]
    return out


def test_official_dit_checkpoint_equals_its_diffusers_copy(tmp_path) -> None:
    torch.manual_seed(0)
    # DiT-S width (384, 6 heads: the head count is read from the published sizes), 2 blocks.
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for block in dit.transformer_blocks[1:]:  # DiT shares one timestep/class embedder; diffusers copies it
            block.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    dit.eval()
    torch.save(_as_official(dit), tmp_path / "DiT-S-2.pt")
    loaded = load_dit_transformer(tmp_path / "DiT-S-2.pt")
    assert loaded.config.num_embeds_ada_norm == 10 and loaded.config.num_layers == 2
    # facebookresearch/DiT's timestep frequencies divide by half, diffusers' by half - 1: the loaded
    # official network uses DiT's, so its diffusers copy matches once given the same embedding.
    unpatched = _probe(dit)
    for block in dit.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    assert torch.equal(_probe(loaded), _probe(dit))
    assert not torch.allclose(unpatched, _probe(dit))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


@pytest.mark.parametrize("how", ["torch_zip", "plain_pickle_pt", "nvlabs_pkl"])
def test_crafted_pickle_is_refused_in_one_line_and_never_runs(tmp_path, how: str) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    blob = {"G_ema": _Payload(marker), "w": torch.ones(2)}
    path = tmp_path / ("network-snapshot.pkl" if how == "nvlabs_pkl" else "model.pt")
    if how == "torch_zip":
        torch.save(blob, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(blob, f)
    with pytest.raises(CfgxError) as e:
        read_state_dict(path)
    msg = str(e.value)
    assert "\n" not in msg and "refusing to load" in msg and "state_dict()" in msg and "trust" in msg
    assert not marker.exists()
    with pytest.raises(CfgxError, match="refusing"):
        load_dit_transformer(path)
    assert not marker.exists()


@pytest.mark.parametrize("hashed", [False, True])
def test_broken_weights_files_are_one_line(tmp_path, hashed: bool) -> None:
    """A safetensors file that is not one, a truncated torch file, a missing file: one line naming the file."""
    from cfgx.pretrained.weights import read_hashed_state_dict

    read = read_hashed_state_dict if hashed else read_state_dict
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04truncated")
    for name in ("bad.safetensors", "cut.pt", "missing.pt"):
        with pytest.raises(CfgxError) as e:
            read(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_sit_checkpoint_is_velocity_on_its_own_time(tmp_path) -> None:
    """SiT: DiT's keys, velocity u = x_data - noise of x' = t x_data + (1 - t) noise, called with t in [0, 1]."""
    from cfgx.diffusion.schedule import NoiseSchedule
    from cfgx.pretrained.dit import load_dit

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    torch.save(_as_official(dit), tmp_path / "SiT-S-2.pt")
    pre = load_dit(tmp_path / "SiT-S-2.pt", family="sit")
    assert (pre.conventions.prediction, pre.conventions.time, pre.conventions.learned_sigma) == ("flow", "flow_rev",
                                                                                                   True)
    schedule = NoiseSchedule("linear", 1000)
    den = pre.denoiser(schedule)
    seen = []
    inner = pre.net.transformer.forward
    pre.net.transformer.forward = lambda x, timestep, class_labels: seen.append((x, timestep)) or inner(
        x, timestep=timestep, class_labels=class_labels)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([600, 600]), torch.tensor([3, 10])
    eps = den(x, t, y)
    abar = float(schedule.alpha_bars[600])
    alpha, sigma = abar ** 0.5, (1 - abar) ** 0.5
    tau = alpha / (alpha + sigma)  # SiT time with the same signal-to-noise ratio
    xp, ts = seen[0]
    torch.testing.assert_close(ts.double(), torch.full((2,), tau, dtype=torch.float64))
    torch.testing.assert_close(xp, x / (alpha + sigma))
    with torch.no_grad():
        u = inner(xp, timestep=ts, class_labels=y).sample[:, :4].double()
    torch.testing.assert_close(eps.double(), xp.double() - tau * u, atol=1e-5, rtol=1e-5)  # x' - t u = noise


def test_unet2d_with_class_table_guided_ddim_equals_a_diffusers_loop(tmp_path) -> None:
    """A v-predicting UNet2DModel (11 class rows: 10 classes + null) saved as unet/ + scheduler/: cfgx's guided
    DDIM equals DDIMScheduler stepping the same guidance (linear, so v-space = eps-space guidance)."""
    from cfgx.diffusion.samplers import build_sampler
    from cfgx.diffusion.schedule import NoiseSchedule
    from cfgx.pretrained.load import open_source
    from cfgx.sample import generate

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=11)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.eval().save_pretrained(tmp_path / "m" / "unet")
    sched = diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False)
    sched.save_pretrained(tmp_path / "m" / "scheduler")
    pre, loader = open_source(str(tmp_path / "m"))
    assert loader == "unet2d" and pre.conventions.prediction == "v" and pre.conventions.null_index == 10

    labels, steps, scale, seed = torch.tensor([0, 4, 9]), 8, 3.0, 5
    schedule = NoiseSchedule(**pre.conventions.schedule)
    ours = generate(pre.denoiser(schedule), build_sampler("ddim", schedule, steps, clip_x0=None, spacing="leading"),
                    pre.shape, labels, scale, seed, 3, torch.device("cpu")).x
    g = torch.Generator().manual_seed(seed * 1_000_003)
    x = torch.randn(3, *pre.shape, generator=g)
    sched.set_timesteps(steps)
    null = torch.full_like(labels, 10)
    with torch.no_grad():
        for t in sched.timesteps:
            c, u = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
            x = sched.step(u + scale * (c - u), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)
    assert x.std() > 0.05
