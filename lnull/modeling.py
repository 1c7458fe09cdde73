"""Loading models/tokenizers from a config's ``model.name_or_path`` and finding target linears."""
from __future__ import annotations

import re
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

        try:
            return str(asset_path(name_or_path[len("asset:"):], cache_dir=cache_dir))
        except ValueError as exc:  # an unknown asset name
            raise ConfigError(f"model.name_or_path '{name_or_path}': {exc}") from None
    if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"model.name_or_path '{name_or_path}' does not exist: {_no_such_folder(name_or_path)}")
    return name_or_path


def _no_such_folder(name_or_path: str) -> str:
    return "no such folder" + ("" if Path(name_or_path).expanduser().is_absolute() else f" (relative to {Path.cwd()})")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_available(name_or_path: str, cache_dir: Optional[str] = None, what: str = "model.name_or_path") -> None:
    """Before any model loads: ``name_or_path`` is the tiny model, a fetched asset, an existing model folder, or a
    hub id that is in the local hub cache or can be downloaded; else a one-line ConfigError saying which and
    what to do. A path-like value (``/``, ``.``, ``~``, or under an existing folder) is never tried as a hub id."""
    from lnull.tiny import TINY_ID

    if name_or_path == TINY_ID:
        return
    if name_or_path.startswith("asset:"):
        try:
            resolve_model(name_or_path, cache_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"{what} '{name_or_path}': {exc}") from None
        return
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ConfigError(f"{what} '{name_or_path}' is a folder without config.json: not a model folder")
        return
    where = _no_such_folder(name_or_path)
    first = Path(name_or_path.split("/", 1)[0]).expanduser()
    if name_or_path.startswith(("/", ".", "~")) or not HUB_ID.match(name_or_path) or first.is_dir():
        raise ConfigError(f"{what} '{name_or_path}' does not exist: {where}")
    from huggingface_hub import try_to_load_from_cache

    from lnull.data.sources import hub_reachable

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return
    todo = "point it at a local model folder, or at an offline asset (asset:smollm2-135m-instruct after `lnull assets`)"
    if not hub_reachable():
        raise ConfigError(f"{what} '{name_or_path}' does not exist: {where}; as a hub id it cannot be downloaded "
                          f"either: the Hugging Face hub is unreachable (offline). {todo[0].upper()}{todo[1:]}")
    from huggingface_hub import repo_exists

    try:
        found = repo_exists(name_or_path)
    except Exception:  # gated / rate-limited / any hub answer that is not "no": let the loader say more
        found = True
    if not found:
        raise ConfigError(f"{what} '{name_or_path}' does not exist: {where}, and the hub has no model of that name; "
                          f"{todo}")


def _model_config(name_or_path: str, cache_dir: Optional[str]) -> Optional[dict[str, Any]]:
    """The model's config.json as a dict when it is at hand without loading anything or going online (the tiny
    model's from code, a fetched asset's, a local folder's, a hub model's in the local hub cache); else None."""
    import json

    from lnull.tiny import TINY_CONFIG, TINY_ID

    if name_or_path == TINY_ID:
        return dict(TINY_CONFIG)
    path: Optional[Path] = None
    if name_or_path.startswith("asset:"):
        from lnull.assets import asset_path

        try:
            path = asset_path(name_or_path[len("asset:"):], cache_dir=cache_dir) / "config.json"
        except (FileNotFoundError, ValueError):
            return None
    elif Path(name_or_path).expanduser().is_dir():
        path = Path(name_or_path).expanduser() / "config.json"
    elif HUB_ID.match(name_or_path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json")
        except Exception:  # noqa: BLE001 (no usable hub cache: nothing to check here)
            return None
        path = Path(cached) if isinstance(cached, str) else None
    try:
        config = json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each projection of a LLaMA-style decoder layer from its config.json (hidden_size,
    intermediate_size, num_attention_heads, num_key_value_heads, head_dim); {} when the config lacks them."""
    config = config.get("text_config", config)  # multimodal wrappers keep the language model's config inside
    try:
        hidden, inter, heads = (int(config[k]) for k in ("hidden_size", "intermediate_size", "num_attention_heads"))
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return {}
    return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden), "v_proj": (kv * head_dim, hidden),
            "o_proj": (hidden, heads * head_dim), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def check_shapes(cfg: Any) -> None:
    """Before calibration: every ``model.target_modules`` name is an ``nn.Linear`` of the model (checked on the
    meta-device skeleton its config.json describes, :func:`_skeleton`; :func:`target_linears`' errors), and the
    method's rank (and its own shape rule, ``Method.check_shape``) fits every targeted projection, with shapes
    read from the model's config.json; skipped silently when no config.json is at hand (a hub name not
    downloaded yet), the shapes when the model is not LLaMA-style. ConfigError naming the value and layer."""
    from lnull.methods import REGISTRY

    method = REGISTRY.get(cfg["method"]["name"])
    if method is None or not method.has_adapter:
        return
    config = _model_config(cfg["model"]["name_or_path"], cfg.get("cache_dir"))
    skeleton = _skeleton(config) if config else None
    if skeleton is not None:  # every target name exists and is an nn.Linear (target_linears' one-line errors)
        try:
            target_linears(skeleton, cfg["model"]["target_modules"])
        except ConfigError as exc:
            raise ConfigError(f"{exc} (model {cfg['model']['name_or_path']})") from None
    shapes = linear_shapes(config) if config else {}
    rank = cfg["method"]["rank"]
    options = None
    for name in cfg["model"]["target_modules"]:
        if name not in shapes:
            continue
        shape = shapes[name]
        if rank > min(shape):
            raise ConfigError(f"method.rank={rank} exceeds min(d_out, d_in)={min(shape)} of {name} {shape} "
                              f"(model {cfg['model']['name_or_path']}); choose method.rank <= {min(shape)}")
        if method.check_shape is not None:
            if options is None:
                from omegaconf import DictConfig, OmegaConf

                section = cfg["method"]
                options = method.make_options(OmegaConf.to_container(section, resolve=True)
                                              if isinstance(section, DictConfig) else dict(section))
            try:
                method.check_shape(shape, options)
            except ConfigError as exc:
                raise ConfigError(f"{exc} ({name} of model {cfg['model']['name_or_path']})") from None


def _skeleton(config: dict[str, Any]) -> Optional[torch.nn.Module]:
    """The modules of the causal LM that ``config`` (a config.json) describes, built on the meta device (no
    memory, no weights, nothing read or downloaded); None when transformers cannot build it that way (no
    ``model_type``, an architecture it does not know, remote code): then nothing is checked before loading."""
    import warnings

    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        values = dict(config)
        hf_config = AutoConfig.for_model(values.pop("model_type"), **values)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                return AutoModelForCausalLM.from_config(hf_config)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception:  # noqa: BLE001 (any failure here only means: no structural pre-flight for this model)
        return None


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


def release_accelerator_memory() -> None:
    """Hand the accelerator's cached memory back once the caller dropped its references to models (end of a
    stage, before vLLM builds its engine): ``gc.collect()`` + ``torch.cuda.empty_cache()``. A cheap no-op
    while CUDA was never initialised in this process (CPU runs)."""
    if not torch.cuda.is_initialized():
        return
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def original_path(cfg: dict[str, Any]) -> str:
    """The run's pre-trained model, ``model.name_or_path`` resolved: what every init's residual is rebuilt from
    (:mod:`lnull.residual`) and whose tokenizer every stage uses."""
    return resolve_model(cfg["model"]["name_or_path"], cfg.get("cache_dir"))


def load_model(path: str, dtype: str = "float32", device: str | torch.device = "cpu",
               attn_implementation: Optional[str] = None) -> Any:
    """Causal LM from ``path`` in ``dtype`` on ``device``, eval mode; ``attn_implementation`` None =
    transformers' default (sdpa). On an accelerator the weights load straight onto it (``device_map``): loading
    on the host first would hold a whole copy there (32 GB for LLaMA-3-8B in fp32)."""
    from transformers import AutoModelForCausalLM

    on_host = torch.device(device).type == "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
                                                 **({} if on_host else {"device_map": str(device)}))
    return (model.to(device) if on_host else model).eval()


def load_tokenizer(path: str) -> Any:
    """The tokenizer of ``path``; one without a pad token (LLaMA-2's) pads with EOS (or UNK when it has no EOS):
    padded positions are always masked out (attention mask, IGNORE_INDEX labels), so the id only fills."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token_id is None:
        raise ConfigError(f"the tokenizer of {path} has no pad, EOS or UNK token to pad batches with")
    return tok


def target_linears(model: torch.nn.Module, target_modules: list[str]) -> dict[str, torch.nn.Linear]:
    """Named ``nn.Linear`` modules whose last name component is in ``target_modules`` (PEFT's rule).

    One-line ConfigError, before any statistic or factor is computed, when a name in ``target_modules`` matches
    no module of the model (naming it and the model's linear layers), or matches a module that is not an
    ``nn.Linear`` (e.g. GPT-2's ``Conv1D``, whose weight is stored [d_in, d_out]): every method, the residual
    and the calibration hooks read ``weight`` as [d_out, d_in]."""
    wanted = set(target_modules)
    found: dict[str, torch.nn.Linear] = {}
    other: dict[str, str] = {}  # target name -> type of a matching module that is not nn.Linear
    seen: set[str] = set()
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last not in wanted:
            continue
        seen.add(last)
        if isinstance(mod, torch.nn.Linear):
            found[name] = mod
        else:
            other.setdefault(last, type(mod).__name__)
    missing = [n for n in target_modules if n not in seen]
    if missing:
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
                         and not isinstance(m, torch.nn.Embedding)})
        raise ConfigError(f"model.target_modules: {', '.join(missing)} match no module of the model "
                          f"({type(model).__name__}; its linear layers: {', '.join(layers)})")
    if other:
        named = ", ".join(f"{n} ({t})" for n, t in sorted(other.items()))
        raise ConfigError(f"model.target_modules: {named} of {type(model).__name__} are not torch.nn.Linear "
                          "layers; lnull's initialisations target nn.Linear only (a Conv1D stores its weight "
                          "transposed, [d_in, d_out])")
    return found
