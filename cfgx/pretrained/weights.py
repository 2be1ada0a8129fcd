"""Pretrained weights without running pickled code: state dicts from ``.safetensors`` or, through the
weights-only unpickler (cfgx/store/safeload.py), ``.pt`` / ``.pth`` / ``.bin``; and facebookresearch/DiT's
official checkpoints mapped onto diffusers' ``DiTTransformer2DModel`` (Peebles & Xie 2023).

A file that needs code to unpickle (an NVlabs network pickle, a pickled ``nn.Module``) is refused in one
line that says how to turn it into a state dict on a machine the user trusts; its payload never runs.
"""

from __future__ import annotations

import math
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from cfgx.errors import CfgxError
from cfgx.store.digest import sha256_of_file
from cfgx.store.safeload import UnsafeFileError, safe_load

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".pkl", ".pickle")
# DiT's published sizes: hidden width -> attention heads (the weights do not say the head count)
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


def _refusal(path: Path) -> CfgxError:
    return CfgxError(
        f"refusing to load {path}: it needs code to unpickle (e.g. an NVlabs network pickle or a pickled nn.Module), "
        "and unpickling runs whatever it says; on a machine you trust, with the code that made it importable, load "
        "it (pickle.load / torch.load(..., weights_only=False)), torch.save(net.state_dict(), 'net.pt') and give "
        "cfgx that file")


def _plain_pickle_needs_code(f: BinaryIO) -> bool:
    """A non-zip pickle naming any global outside torch/collections: read opcode by opcode, nothing executed."""
    f.seek(0)
    if zipfile.is_zipfile(f):
        return False  # torch's zip format: the weights-only unpickler judges it
    f.seek(0)
    strings: list[str] = []  # protocol 4 names a global by the two strings pushed before STACK_GLOBAL
    try:
        for op, arg, _ in pickletools.genops(f):
            if "UNICODE" in op.name:
                strings = [*strings[-1:], str(arg)]
            module = None
            if op.name in ("GLOBAL", "INST"):
                module = str(arg).split(" ")[0]
            elif op.name == "STACK_GLOBAL":
                module = strings[0] if len(strings) == 2 else ""
            if module is not None and not module.startswith(("torch", "collections")):
                return True
    except (ValueError, pickle.UnpicklingError, EOFError):
        return False  # not a pickle at all: safe_load says so
    return False


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` state dict from safetensors or a weights-only torch file; ``ema``/``model`` unwrapped."""
    return _read_state_dict(Path(path), hash_it=False)[0]


def read_hashed_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """``read_state_dict`` and the file's sha256, both from one open file.

    Hashing by name and then loading by name would let a file replaced in between be loaded under the
    old file's digest (rows would name weights that were not the ones used); one open file cannot change.
    """
    sd, digest = _read_state_dict(Path(path), hash_it=True)
    assert digest is not None
    return sd, digest


def _read_state_dict(path: Path, hash_it: bool) -> tuple[dict[str, torch.Tensor], str | None]:
    if path.suffix in PICKLE_SUFFIXES:
        raise _refusal(path)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise CfgxError(f"{path}: cfgx reads weights from {', '.join(STATE_DICT_SUFFIXES)} state dicts only")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CfgxError(f"cannot read {path} ({e.strerror or type(e).__name__}); check the path") from None
    with f:
        digest = sha256_of_file(f) if hash_it else None
        if path.suffix == ".safetensors":
            # why: safetensors is in the [pretrained]/[export] extras; only this branch needs it
            from safetensors.torch import load, load_file

            f.seek(0)
            try:
                # Hashed: parse the very bytes hashed. Otherwise load_file maps the file (no second copy in memory).
                return (load(f.read()) if hash_it else load_file(str(path))), digest
            except Exception as e:  # the format's own errors: a header that is not JSON, data cut short
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CfgxError(f"{path} is not a readable safetensors file ({why}); re-download it") from None
        if _plain_pickle_needs_code(f):
            raise _refusal(path)
        f.seek(0)
        try:
            sd = safe_load(path, fix="re-download it", file=f)
        except UnsafeFileError:
            raise _refusal(path) from None
    for key in ("ema", "model", "state_dict"):  # training checkpoints: the (EMA) network's weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CfgxError(f"{path} is not a state dict ({{name: tensor}}); save net.state_dict() instead")
    return sd, digest


def is_official_dit(sd: dict[str, torch.Tensor]) -> bool:
    return "x_embedder.proj.weight" in sd and "final_layer.linear.weight" in sd


def official_dit_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers DiT config of an official checkpoint, read from its tensor shapes."""
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    if hidden not in DIT_HEADS:
        raise CfgxError(f"DiT width {hidden} is none of the published models ({sorted(DIT_HEADS)}); "
                        "give its config as a diffusers folder instead")
    heads = DIT_HEADS[int(hidden)]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    patches = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    side = int(math.isqrt(int(patches))) * int(p) if patches else None
    if side is None:
        raise CfgxError("the DiT checkpoint has no pos_embed to read its resolution from")
    return {"num_attention_heads": heads, "attention_head_dim": int(hidden) // heads, "in_channels": int(in_ch),
            "out_channels": int(sd["final_layer.linear.weight"].shape[0]) // (int(p) ** 2), "num_layers": layers,
            "sample_size": side, "patch_size": int(p),
            "num_embeds_ada_norm": int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1}


def official_dit_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/DiT keys -> diffusers DiTTransformer2DModel keys (the timestep and class embedders,
    shared in DiT, are copied into every block, as diffusers holds them there)."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    layers = official_dit_config(sd)["num_layers"]
    for i in range(layers):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[b + "attn.qkv.bias"].chunk(3)
        for kind in ("weight", "bias"):
            out[d + f"norm1.emb.timestep_embedder.linear_1.{kind}"] = sd[f"t_embedder.mlp.0.{kind}"]
            out[d + f"norm1.emb.timestep_embedder.linear_2.{kind}"] = sd[f"t_embedder.mlp.2.{kind}"]
            out[d + f"norm1.linear.{kind}"] = sd[b + f"adaLN_modulation.1.{kind}"]
            out[d + f"attn1.to_out.0.{kind}"] = sd[b + f"attn.proj.{kind}"]
            out[d + f"ff.net.0.proj.{kind}"] = sd[b + f"mlp.fc1.{kind}"]
            out[d + f"ff.net.2.{kind}"] = sd[b + f"mlp.fc2.{kind}"]
        out[d + "norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        out.update({d + "attn1.to_q.weight": q, d + "attn1.to_k.weight": k, d + "attn1.to_v.weight": v,
                    d + "attn1.to_q.bias": qb, d + "attn1.to_k.bias": kb, d + "attn1.to_v.bias": vb})
    return out


def load_dit_transformer(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A DiT transformer from an official checkpoint file, or a diffusers transformer folder whose weights
    are .safetensors, .bin or .pt (all read without unpickling code)."""
    # why: diffusers is the optional [pretrained] extra; only this loader needs it
    from diffusers import DiTTransformer2DModel

    path = Path(path)
    if path.is_file():
        sd = read_state_dict(path)
        if not is_official_dit(sd):
            raise CfgxError(f"{path} is not a facebookresearch/DiT checkpoint (no x_embedder/final_layer); give a "
                            "diffusers folder (config.json beside the weights) for other layouts")
        model = DiTTransformer2DModel(**official_dit_config(sd))
        model.load_state_dict(official_dit_to_diffusers(sd))
        # DiT's timestep frequencies are exp(-ln(1e4) i / half); diffusers' DiT divides by half - 1. Weights
        # trained by facebookresearch/DiT see their own embedding.
        for block in model.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        return model.to(device).eval()
    return load_diffusers_model(DiTTransformer2DModel, path).to(device).eval()


def load_diffusers_model(cls, folder: Path) -> torch.nn.Module:
    """A diffusers model class from ``folder``'s config.json and its weights in .safetensors, .bin or .pt."""
    files = [folder / f"diffusion_pytorch_model{s}" for s in (".safetensors", ".bin", ".pt")]
    found = next((f for f in files if f.is_file()), None)
    if found is None or not (folder / "config.json").is_file():
        raise CfgxError(f"{folder} holds no config.json with diffusion_pytorch_model.safetensors|.bin|.pt")
    model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(read_state_dict(found))
    return model
