"""LoRA for the update stage (`update.lora_r > 0`), built on PEFT.

With LoRA only the adapter trains: every base weight has `requires_grad` False and the
optimizer holds the adapter's parameters alone. `update.lora_target_modules` names the
Linear layers that get an adapter (PEFT's suffix rule: `q_proj` matches
`model.layers.0.self_attn.q_proj`), or `all-linear` for every Linear layer but the LM
head; a name that matches no Linear layer is a `LoraTargetError` (exit code 2) listing the
model's Linear layers. The names are resolved here to full module names before PEFT sees
them, so what gets an adapter is exactly what was checked.

Iteration chaining. The update reads `policy` (the model the iteration starts from) and
`reference` (always the initial model). `plan` decides the base the adapter sits on:

- the policy folder holds `adapter/` trained on the reference (its `trainer_state.json`
  says so and the reference's weight fingerprint matches): the base is the reference, the
  adapter is loaded trainable and the optimizer state is resumed (`resume`);
- the policy *is* the reference (iteration 0, same folder): the base is the reference and
  a fresh adapter starts (seeded by the update's seed; B = 0, so the first forward equals
  the base's);
- anything else (a fully fine-tuned policy given with `--input policy=...`, LoRA switched
  on mid-run, an adapter trained on another reference, or one whose rank, alpha, dropout
  or layers differ from `update.lora_*` now): the base is the policy itself, with
  a fresh adapter and a fresh optimizer; the global step still continues. This keeps
  what the policy already learned (starting the adapter on the reference instead would
  throw the policy's training away), it needs no weights that are not inputs of this
  stage, and the policy's saved optimizer state (full-model shapes, or an adapter
  trained against another base) cannot be resumed meaningfully. The KL reference stays
  the `reference` input, loaded separately when `update.beta > 0`. A run that continues
  from such an update keeps taking this branch (the adapter's base is not the
  reference): each iteration's adapter is merged into the next iteration's base, as
  in ReLoRA.

In the first two cases base == reference, so the KL reference (`update.beta > 0`) is the
same model with the adapter switched off (`disabled_adapter`): no second copy is loaded.

Saving (`save`): `model/` gets the merged full weights W + (alpha / r) * B @ A as a plain
Hugging Face checkpoint (`from_pretrained` loads it; the rollout engines and vLLM's
weight sync read it as any policy), computed into a new state dict, so the in-memory
base and adapter are left as they were; `model/adapter/` gets the PEFT adapter
(adapter_config.json + adapter_model.safetensors) that the next iteration resumes.

peft is imported only here, inside functions, and this module only when `lora_r > 0`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import EqLenError

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "default"
ALL_LINEAR = "all-linear"


class LoraTargetError(EqLenError, ValueError):
    pass


def _linear_classes():
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def linear_modules(model) -> list[str]:
    """Full names of the Linear (and GPT-2 Conv1D) layers that may get an adapter: all but
    the LM head (the output embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, _linear_classes()) and m is not head
    ]


def resolve_targets(model, targets) -> list[str]:
    """`update.lora_target_modules` -> the sorted full names of the layers that get one."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    candidates = linear_modules(model)
    if not targets:
        raise LoraTargetError(
            "update.lora_target_modules is empty: name the Linear layers that get an "
            f"adapter (e.g. [q_proj,v_proj]) or use [{ALL_LINEAR}]"
        )
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise LoraTargetError(
                f"update.lora_target_modules: {ALL_LINEAR} already names every Linear "
                f"layer; give it alone, not with {[t for t in targets if t != ALL_LINEAR]}"
            )
        return sorted(candidates)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {n for n, m in model.named_modules() if head is not None and m is head}
    chosen, missing = set(), []
    for t in targets:
        hit = [n for n in candidates if n == t or n.endswith("." + t)]
        if not hit:
            missing.append(t)
        chosen.update(hit)
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        on_head = [t for t in missing if any(n == t or n.endswith("." + t) for n in head_names)]
        why = f" ({', '.join(on_head)} is the LM head, which gets no adapter)" if on_head else ""
        raise LoraTargetError(
            f"update.lora_target_modules: {', '.join(map(repr, missing))} matches no Linear "
            f"layer of the model{why}. Its Linear layers are {', '.join(short)} (e.g. "
            f"{candidates[0] if candidates else 'none'}); give some of these names, or "
            f"{ALL_LINEAR}"
        )
    return sorted(chosen)


def fingerprint(model) -> str:
    """sha256 over every parameter's name, shape, dtype and its first and last 64 values:
    device-independent and exact, cheap, and different for any fine-tuned copy."""
    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", copy=True).contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}\0".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Plan:
    """Where the base comes from and whether the policy's adapter and optimizer resume."""

    base: str  # "reference" or "policy"
    resume: bool  # load <policy>/adapter/ trainable, and the policy's optimizer state
    why: str


def plan(policy: Path, reference: Path, state: dict) -> Plan:
    """The chaining rule of the module docstring, from the folders and the policy's
    trainer_state.json (`state`); the fingerprint check happens once the base is loaded."""
    lora = state.get("lora") or {}
    if (policy / ADAPTER_DIR).is_dir() and lora.get("base") == "reference":
        return Plan("reference", True, "resuming the policy's adapter on the reference")
    if policy.resolve() == reference.resolve():
        return Plan("reference", False, "fresh adapter on the reference")
    return Plan(
        "policy",
        False,
        "fresh adapter on the policy (it is not the reference and holds no adapter trained on it)",
    )


def wrap(base, u, adapter_dir: Path | None):
    """The PEFT model: a fresh LoRA of `u.lora_*` on `base`, or the saved adapter
    `adapter_dir` loaded trainable. Only the adapter's parameters require grad."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    else:
        cfg = LoraConfig(
            r=u.lora_r,
            lora_alpha=u.lora_alpha,
            lora_dropout=u.lora_dropout,
            target_modules=resolve_targets(base, u.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, cfg)
    # Recorded paths would tie the output's bytes (and digest) to where the model lies.
    model.peft_config[ADAPTER_NAME].base_model_name_or_path = None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def lora_layers(model) -> dict[str, object]:
    """{full module name in the base model: PEFT LoRA layer}."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model) -> dict:
    """The base model's state dict under its original names with W + (alpha / r) * B @ A
    for every adapted layer: new tensors, the model itself is not touched."""
    import torch

    base = model.get_base_model()
    layers = lora_layers(model)
    out = {}
    with torch.no_grad():
        for key, t in base.state_dict().items():
            if ".lora_" in key:
                continue
            mod, _, leaf = key.rpartition(".base_layer.")
            if mod in layers:
                key = f"{mod}.{leaf}"
                if leaf == "weight":
                    t = t + layers[mod].get_delta_weight(ADAPTER_NAME).to(t.dtype)
            out[key] = t
    return out


def save(model, folder: Path) -> None:
    """Merged full weights into `folder` (a plain HF checkpoint), the adapter into
    `folder/adapter/`."""
    base = model.get_base_model()
    base.save_pretrained(folder, state_dict=merged_state_dict(model))
    model.save_pretrained(folder / ADAPTER_DIR)
    (folder / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub


class DisabledAdapter:
    """The base model as the KL reference: `model` with its adapter switched off (and in
    eval mode, as a separately loaded reference is) for the duration of each call."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)


def state_record(model, plan_: Plan, reference_fingerprint: str | None) -> dict:
    """What trainer_state.json records for the next iteration's `plan`."""
    out = {"base": plan_.base, "r": int(model.peft_config[ADAPTER_NAME].r)}
    if reference_fingerprint is not None:
        out["reference_fingerprint"] = reference_fingerprint
    return out


def _cannot_resume(adapter: Path, base, u, state: dict, ref_fp: str) -> str:
    """Why the saved adapter cannot go on training here, or "" when it can: it must sit on
    this reference and have the configured shape (rank, alpha, dropout, layers)."""
    if (state.get("lora") or {}).get("reference_fingerprint") != ref_fp:
        return "it was trained on another reference model"
    try:
        saved = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return "its adapter_config.json cannot be read"
    want = {
        "r": u.lora_r,
        "lora_alpha": u.lora_alpha,
        "lora_dropout": u.lora_dropout,
        "target_modules": sorted(resolve_targets(base, u.lora_target_modules)),
    }
    got = dict(saved, target_modules=sorted(saved.get("target_modules") or []))
    diff = [k for k, v in want.items() if got.get(k) != v]
    return f"its {', '.join(diff)} differ from update.lora_*" if diff else ""


def build(policy: Path, reference: Path, u, device, *, load, log, state: dict, checkpointing):
    """(PEFT model, KL reference or None, whether to resume the optimizer, trainer_state's
    `lora` record) for one update, loading as few models as the plan allows: one, unless
    the base is not the reference and beta > 0."""
    p = plan(policy, reference, state)
    base = load(reference if p.base == "reference" else policy, device)
    ref_model, ref_fp = None, None
    if p.base == "reference":
        ref_fp = fingerprint(base)
        why = p.resume and _cannot_resume(policy / ADAPTER_DIR, base, u, state, ref_fp)
        if why:
            log(
                f"  update: not resuming {policy / ADAPTER_DIR}: {why}; fresh adapter on the policy"
            )
            ref_model = base if u.beta > 0 else None
            base, ref_fp = load(policy, device), None
            p = Plan("policy", False, f"fresh adapter on the policy ({why})")
    if p.base == "policy" and u.beta > 0 and ref_model is None:
        ref_model = load(reference, device)
    if checkpointing:
        base.gradient_checkpointing_enable()
        base.config.use_cache = False
        base.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad
    model = wrap(base, u, policy / ADAPTER_DIR if p.resume else None)
    if u.beta > 0 and ref_model is None:
        ref_model = DisabledAdapter(model)
    log(f"  update: LoRA r={model.peft_config[ADAPTER_NAME].r}: {p.why}")
    return model, ref_model, p.resume, state_record(model, p, ref_fp)
