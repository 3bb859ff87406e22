"""Loading the policy and its tokenizer from a local Hugging Face folder.

Real `from_pretrained` loading, so any causal LM saved with `save_pretrained` works; the
checks here turn the usual failure modes (no tokenizer, no EOS, no pad) into errors that
name the folder and what to do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import EqLenError


class ModelError(EqLenError, ValueError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ModelError(f"{model_dir}: no usable tokenizer ({e}). Save one next to the model "
                         "with tokenizer.save_pretrained(folder).") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{model_dir}: the tokenizer has no EOS token, so responses cannot end. "
                         "Set tokenizer.eos_token and save it again.")
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:  # pragma: no cover - caught above
            raise ModelError(f"{model_dir}: the tokenizer has neither pad nor EOS token.")
        tok.pad_token = tok.eos_token  # the common convention (TRL does the same)
    tok.padding_side = "left"
    return tok


def load_policy(model_dir: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()
