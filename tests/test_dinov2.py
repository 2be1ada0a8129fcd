"""DINOv2 feature space (issue 19 item 1): the official state dict in timm's ViT, EDM2's preprocessing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cfgx.errors import CfgxError
from cfgx.metrics.dinov2 import (
    DINOV2_URL,
    DinoV2FeatureNet,
    dinov2_extractor,
    edm2_preprocess,
    official_to_timm,
    vit_for,
)
from cfgx.metrics.inception import weights_sha256


def official_state(dim: int, depth: int, grid: int = 37, seed: int = 0, device: str = "cpu") -> dict:
    """Random tensors under the names and shapes of facebookresearch's dinov2_vit*14_pretrain.pth."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * scale

    s = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim), "mask_token": r(1, dim),
         "patch_embed.proj.weight": r(dim, 3, 14, 14, scale=0.02), "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
                  b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                  b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim), b + "ls1.gamma": r(dim),
                  b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                  b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                  b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim), b + "ls2.gamma": r(dim)})
    s.update({"norm.weight": 1 + r(dim), "norm.bias": r(dim)})
    return s


def reference_dinov2(s: dict, x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """The official DinoVisionTransformer's forward, written out from its state dict: CLS after the norm."""
    n, _, h, w = x.shape
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat([s["cls_token"].expand(n, -1, -1), t], dim=1)
    # interpolate_pos_encoding(x, w, h) of the hub model: offset 0.1, bicubic, no antialias
    pos, m, dim = s["pos_embed"], 37, t.shape[-1]
    sx, sy = (w // 14 + 0.1) / m, (h // 14 + 0.1) / m
    pp = F.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
                       scale_factor=(sx, sy)).permute(0, 2, 3, 1).reshape(1, -1, dim)
    t = t + torch.cat([pos[:, :1], pp], dim=1)
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(t, (dim,), s[b + "norm1.weight"], s[b + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(y, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"]).reshape(
            n, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(dim // heads)).softmax(-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(n, -1, dim), s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        t = t + s[b + "ls1.gamma"] * a
        y = F.layer_norm(t, (dim,), s[b + "norm2.weight"], s[b + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])), s[b + "mlp.fc2.weight"],
                     s[b + "mlp.fc2.bias"])
        t = t + s[b + "ls2.gamma"] * y
    return F.layer_norm(t, (dim,), s["norm.weight"], s["norm.bias"], eps=1e-6)[:, 0]


def _images(n: int, size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(5))


def test_official_keys_load_with_nothing_missing_and_give_the_official_features(tmp_path):
    state = official_state(dim=64, depth=2)
    path = tmp_path / "dinov2_small_pretrain.pth"
    torch.save(state, path)
    ext = dinov2_extractor(path, batch_size=3)  # strict load inside: a missing/unexpected key fails here
    assert ext.provenance()["weights_sha256"] == weights_sha256(path)
    x = _images(4)
    got = ext(x)
    assert got.pool.shape == (4, 64) and got.logits is None
    with torch.no_grad():
        ref = reference_dinov2(state, edm2_preprocess(x), depth=2, heads=1)
    assert torch.allclose(got.pool.float(), ref, rtol=1e-4, atol=1e-5), (got.pool.float() - ref).abs().max()
    gray = ext(_images(2, channels=1)).pool  # grayscale replicated to RGB, as EDM2 does
    assert torch.allclose(gray, ext(_images(2, channels=1).repeat(1, 3, 1, 1)).pool)


def test_vit_l14_official_names_and_shapes_match_timm_exactly():
    state = official_state(dim=1024, depth=24, device="meta")
    assert state["pos_embed"].shape == (1, 1370, 1024)
    with torch.device("meta"):
        vit = vit_for(state)
    want = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in official_to_timm(state).items()}
    assert have == want and want["pos_embed"] == (1, 257, 1024)


def test_preprocessing_equals_bicubic_antialiased_interpolate_on_uint8():
    x = _images(2, size=40)
    want = F.interpolate(x.float(), size=224, mode="bicubic", antialias=True) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.equal(edm2_preprocess(x), (want - mean) / std)


def test_missing_weights_name_the_file_and_how_to_get_it(tmp_path):
    with pytest.raises(CfgxError) as err:
        dinov2_extractor(tmp_path / "dinov2_vitl14_pretrain.pth")
    msg = str(err.value)
    assert "\n" not in msg and "dinov2_vitl14_pretrain.pth" in msg and "cfgx prepare dinov2" in msg
    assert DINOV2_URL in msg


def test_a_state_dict_with_a_wrong_key_is_refused_as_one_line(tmp_path):
    state = official_state(dim=64, depth=1)
    state["blocks.0.attn.extra"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CfgxError, match="could not be loaded") as err:
        dinov2_extractor(tmp_path / "w.pth")
    assert "\n" not in str(err.value)
    assert isinstance(DinoV2FeatureNet(official_state(dim=64, depth=1)), torch.nn.Module)


# ----------------------------------------------------------------------------- end to end (tiny digits run)


def test_sweep_scores_fd_dinov2_and_an_edm2_reference_file_reproduces_it(tiny_run, tmp_path_factory, workdir, capsys):
    import json

    from conftest import private_copy

    from cfgx.cli.entry import main

    run = private_copy(tiny_run, tmp_path_factory, "dinov2")
    weights = workdir / "dinov2_small.pth"
    torch.save(official_state(dim=64, depth=2), weights)
    dino = ["eval.features=[classifier,dinov2]", f"eval.dinov2_weights={weights}", "eval.num_samples=20",
            "eval.real_samples=200"]  # DINOv2 at 224 px costs ~10 ms an image here
    assert main(["sweep", "guidance=1", f"run={run}", *dino, "eval.dinov2_pr=true"]) == 0, capsys.readouterr().err
    # the shared tiny run may already hold 20-sample rows of other tests' sweeps (no DINOv2 space): this one's
    rows = [r for r in json.loads((run / "metrics.json").read_text()) if r["num_samples"] == 20 and "fd_dinov2" in r]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["fd_dinov2"] > 0 and 0 <= row["precision_dinov2"] <= 1 and row["vendi_dinov2"] >= 1
    assert row["dinov2_weights"] == weights_sha256(weights) and row["extractor_dinov2"] == "dinov2-vitl14-edm2"
    # The same reference set written as EDM2's pickle and read back gives the same FD_DINOv2.
    ref = workdir / "digits_ref.pkl"
    clf = ["eval.classifier.steps=150", "eval.classifier.width=8"]  # the run's classifier: cached
    assert main(["reference", f"out={ref}", "format=edm", "dataset=digits", *dino, *clf]) == 0, capsys.readouterr()
    assert main(["sweep", "guidance=1", f"run={run}", *dino, f"eval.reference=edm:{ref}"]) == 0
    rows = [r for r in json.loads((run / "metrics.json").read_text()) if r.get("reference")]
    assert len(rows) == 1 and rows[0]["reference"].startswith(f"edm:{ref} sha256=")
    assert abs(rows[0]["fd_dinov2"] - row["fd_dinov2"]) <= 1e-9 * row["fd_dinov2"]


def test_offline_without_dinov2_weights_fails_before_sampling(tiny_run, tmp_path_factory, workdir, capsys):
    from conftest import private_copy

    from cfgx.cli.entry import main

    run = private_copy(tiny_run, tmp_path_factory, "dinov2_offline")
    before = sorted(p.name for p in (run / "sweep").rglob("*"))
    missing = workdir / "nowhere" / "dinov2_vitl14_pretrain.pth"
    assert main(["sweep", "guidance=9", f"run={run}", "eval.features=[classifier,dinov2]",
                 f"eval.dinov2_weights={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err and "cfgx prepare dinov2" in err
    assert sorted(p.name for p in (run / "sweep").rglob("*")) == before  # nothing sampled or written
