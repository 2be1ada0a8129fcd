"""Fetching a pretrained model ahead of time (for ``cfgx prepare``): a Hugging Face hub id -> a local folder
that ``cfgx import model=FOLDER`` reads. Only configs and safetensors weights are downloaded (no pickles);
nothing in cfgx downloads at sweep time.
"""

from __future__ import annotations

from pathlib import Path

from cfgx.errors import CfgxError

# Known ids and what they are (the README's recipes); any other diffusers repo id works the same.
KNOWN = {
    "facebook/DiT-XL-2-256": "DiT-XL/2, ImageNet 256x256 (diffusers layout: transformer/, vae/, scheduler/)",
    "facebook/DiT-XL-2-512": "DiT-XL/2, ImageNet 512x512 (diffusers layout)",
}
PATTERNS = ["*.json", "*.safetensors", "*.txt"]


def fetch_pretrained(repo_id: str, dest: str | Path, revision: str | None = None) -> Path:
    """Download ``repo_id``'s configs and safetensors weights into ``dest``; returns the folder for ``cfgx import``.

    A repository whose weights exist only as pickles (.bin/.pt) fetches no weights: that is one line saying so.
    """
    # why: huggingface_hub comes with the [pretrained] extra (a diffusers dependency); only fetching needs it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    dest = Path(dest).expanduser()
    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_dir=dest, allow_patterns=PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise CfgxError(f"cannot fetch {repo_id} into {dest} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        "run cfgx prepare on a machine with internet and copy the folder over") from None
    if not any(path.rglob("*.safetensors")):
        raise CfgxError(f"{repo_id} has no .safetensors weights; convert its .bin/.pt on a trusted machine "
                        "(DiTPipeline.from_pretrained(d).save_pretrained(d, safe_serialization=True))")
    return path
