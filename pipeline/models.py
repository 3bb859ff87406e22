"""Loading the policy and its tokenizer from a local Hugging Face folder.

`model` in the config is `demo`, a local folder, or a hub id (`Qwen/Qwen2.5-0.5B-Instruct`):
`resolve_model` turns an id into its snapshot folder in the local Hugging Face cache
(`huggingface_hub.snapshot_download`, which honours `HF_HUB_OFFLINE`, `HF_HOME` and
`HF_HUB_CACHE`; offline, an uncached id is an error saying so), so every stage, the cache
keys and vLLM see one local folder. `model_trust_remote_code` is passed to
`from_pretrained` (and vLLM): off unless set, since it runs Python shipped with the model.

Real `from_pretrained` loading, so any causal LM saved with `save_pretrained` works; the
checks here turn the usual failure modes (no config, no weights, no tokenizer, no EOS, no
pad) into errors that name the folder and what to do. `check_folder` and
`max_positions` read only files (no torch, no transformers), so the command line's
preflight can run them in a fraction of a second before any stage starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import EqLenError

if TYPE_CHECKING:  # torch is imported where a model is loaded, not to check a folder
    import torch

# What `save_pretrained` writes for the weights (single file or sharded with an index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Any of these means a tokenizer was saved next to the model (fast, SentencePiece, BPE,
# WordPiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
# Where configs of common architectures keep their context length (Llama, Qwen2, Mistral:
# max_position_embeddings; GPT-2: n_positions; others: the rest).
POSITION_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)


# The shipped demo checkpoint (built by `python -m pipeline.demo build`): a path that needs
# no transformers import to compute.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_assets" / "model"
# The shipped model of the `pad` task (built by `python -m pipeline.pad_task --build`).
PAD_MODEL_DIR = Path(__file__).resolve().parent / "pad_assets" / "model"


class ModelError(EqLenError, ValueError):
    pass


# What a snapshot of a hub model needs: configs, safetensors weights, tokenizer files and
# the chat template (Python files only with model_trust_remote_code).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")


def is_hub_id(name: str) -> bool:
    """`org/name` (or `name`) that is no path here: a hub model id."""
    import re

    p = Path(name).expanduser()
    return not p.exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def resolve_model(name: str, trust_remote_code: bool = False, what: str = "model") -> Path:
    """The local folder of `name`: itself, or a hub id's snapshot (downloaded into the
    local Hugging Face cache unless HF_HUB_OFFLINE=1, when it must be there already)."""
    if name == "demo":
        return DEMO_MODEL_DIR
    if name == "pad":
        return PAD_MODEL_DIR
    if not is_hub_id(name):
        return Path(name).expanduser()
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [*HUB_PATTERNS, *(["*.py"] if trust_remote_code else [])]
    try:
        folder = snapshot_download(name, allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        offline = constants.HF_HUB_OFFLINE
        raise ModelError(
            f"{what}={name}: no such folder, and "
            + (
                f"with HF_HUB_OFFLINE=1 the hub id {name!r} is not in the local Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}). Download it once where there is network "
                "access (`hf download " + name + "`), or give a local model folder."
                if offline
                else f"the hub id {name!r} could not be fetched ({e}). Check the id and the "
                "network, or give a local model folder."
            )
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelError(
            f"{what}={name}: the hub id could not be loaded ({type(e).__name__}: {e}). Check "
            "the id, or give a local model folder."
        ) from None
    return Path(folder)


def check_folder(model_dir: str | Path, what: str = "model", tokenizer: bool = True) -> dict:
    """Check that a folder holds a loadable model (config.json, weights and, with
    `tokenizer`, tokenizer files); return its parsed config.json. Reads only files."""
    p = Path(model_dir).expanduser()
    hint = (
        "give a folder written by model.save_pretrained(folder) and "
        "tokenizer.save_pretrained(folder)"
    )
    if not p.exists():
        raise ModelError(f"{what}: {p} does not exist; {hint}, or `demo`")
    if not p.is_dir():
        raise ModelError(f"{what}: {p} is a file, not a model folder; {hint}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelError(
            f"{what}: {p} is not a Hugging Face model folder (no config.json); {hint}, or `demo`"
        )
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(
            f"{what}: {cfg_file} is not valid JSON ({e}); save the model again with save_pretrained"
        ) from None
    except PermissionError:
        raise ModelError(f"{what}: {cfg_file} cannot be read (permission denied)") from None
    if not isinstance(config, dict):
        raise ModelError(
            f"{what}: {cfg_file} does not hold a JSON object; save the model "
            "again with save_pretrained"
        )
    weights = [f for f in WEIGHT_FILES if (p / f).is_file()]
    if not weights:
        others = sorted(x.name for x in p.glob("*.safetensors")) + sorted(
            x.name for x in p.glob("*.bin")
        )
        found = f" (found only {', '.join(others[:4])})" if others else ""
        raise ModelError(
            f"{what}: {p} has a config.json but no weights{found}: expected "
            f"{' or '.join(WEIGHT_FILES[::2])} (or a sharded checkpoint with its "
            f"index). Save the weights with model.save_pretrained({p.name!r})."
        )
    for index in (w for w in weights if w.endswith(".index.json")):
        try:
            shards = set(json.loads((p / index).read_text()).get("weight_map", {}).values())
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ModelError(
                f"{what}: {p / index} is not a valid weight index; save the "
                "model again with save_pretrained"
            ) from None
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise ModelError(
                f"{what}: {p / index} lists weight shards that are missing: "
                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}. "
                "Copy the whole folder."
            )
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"{what}: {p} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}"
            ", ...). Save one next to the model with "
            "tokenizer.save_pretrained(folder)."
        )
    return config


def max_positions(config: dict) -> tuple[str, int] | None:
    """(key, value) of the longest sequence the model's positions cover, from its
    config.json (the text part of a multimodal config), or None when it declares none."""
    for c in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            v = c.get(key) if isinstance(c, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return key, v
    return None


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{model_dir}: no usable tokenizer ({e}). Save one next to the model "
            "with tokenizer.save_pretrained(folder)."
        ) from None
    if tok.eos_token_id is None:
        raise ModelError(
            f"{model_dir}: the tokenizer has no EOS token, so responses cannot end. "
            "Set tokenizer.eos_token and save it again."
        )
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:  # pragma: no cover - caught above
            raise ModelError(f"{model_dir}: the tokenizer has neither pad nor EOS token.")
        tok.pad_token = tok.eos_token  # the common convention (TRL does the same)
    tok.padding_side = "left"
    return tok


def load_policy(
    model_dir: str | Path,
    device: torch.device,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    check_folder(model_dir, tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()
