"""Loading models/tokenizers from a config's ``model.name_or_path`` and finding target linears."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from lnull.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root(cache_dir: Optional[str]) -> Path:
    from lnull.assets import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


def resolve_model(name_or_path: str, cache_dir: Optional[str] = None) -> str:
    """Local folder or hub name for ``name_or_path`` (``lnull:tiny`` and ``asset:<name>`` resolved)."""
    from lnull.tiny import TINY_ID, materialize

    if name_or_path == TINY_ID:
        return str(materialize(cache_root(cache_dir) / "models" / "tiny-llama"))
    if name_or_path.startswith("asset:"):
        from lnull.assets import asset_path

        return str(asset_path(name_or_path[len("asset:"):], cache_dir=cache_dir))
    if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"model.name_or_path '{name_or_path}' does not exist")
    return name_or_path


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def model_fingerprint(name_or_path: str, cache_dir: Optional[str] = None) -> dict[str, Any]:
    """What identifies a model's weights cheaply (no full read of multi-GB files): for a folder, sha256 of its
    config.json and of each weight file's name and size; for a hub name, the name (no revision pinned)."""
    import hashlib
    import json

    resolved = resolve_model(name_or_path, cache_dir)
    folder = Path(resolved)
    if not folder.is_dir():
        return {"name_or_path": name_or_path, "sha256": None}
    digest = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").exists() else b"")
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    digest.update(json.dumps([(p.name, p.stat().st_size) for p in files]).encode())
    return {"name_or_path": name_or_path, "sha256": digest.hexdigest()[:16]}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    return torch.device(device)


def load_model(path: str, dtype: str = "float32", device: str | torch.device = "cpu",
               attn_implementation: Optional[str] = None) -> Any:
    """Causal LM from ``path`` in ``dtype`` on ``device``, eval mode; ``attn_implementation`` None =
    transformers' default (sdpa)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    return model.to(device).eval()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def target_linears(model: torch.nn.Module, target_modules: list[str]) -> dict[str, torch.nn.Linear]:
    """Named ``nn.Linear`` modules whose last name component is in ``target_modules`` (PEFT's rule)."""
    found = {name: mod for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules}
    if not found:
        raise ConfigError(f"model.target_modules {list(target_modules)} match no linear layer of the model")
    return found
