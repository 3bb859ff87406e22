"""LoRA updates (stages/lora.py) with real PEFT and transformers on a tiny Llama: the saved
merged weights are base + (alpha / r) * B @ A recomputed from the saved adapter, only the
adapter trains, a second iteration resumes adapter, optimizer and step, the KL reference is
the disabled-adapter base (no second model), bad target names are a clear error, and the
saved model/ loads with from_pretrained and differs from the base."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from eqlen_testing.synthetic import synthetic_scored
from flows import runner
from pipeline import config
from pipeline.errors import EqLenError
from pipeline.models import load_policy
from stages import lora, pair, update

R, ALPHA = 4, 16


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A copy of the shipped demo model (tiny Llama, untied LM head) as the initial model."""
    from pipeline.demo import demo_model_dir

    out = tmp_path_factory.mktemp("lora-base") / "model"
    shutil.copytree(demo_model_dir(), out)
    return out


@pytest.fixture(scope="module")
def units_dir(tmp_path_factory):
    """Group units of 8 synthetic prompts x 4 tracks with rewards that vary within units."""
    root = tmp_path_factory.mktemp("lora-units")
    cfg = config.load(None, ["generate.group_size=4", "generate.max_new_tokens=8"])
    scored = synthetic_scored(
        32, rounds=1, group_size=4, max_new_tokens=8, prompt_len=(3, 6), vocab=261, seed=3
    )
    (root / "scored").mkdir()
    pq.write_table(scored, root / "scored" / "scored.parquet")
    (root / "units").mkdir()
    pair.run({"scored": root / "scored"}, root / "units", cfg, runner.Context(iteration=0))
    return root / "units"


def lora_cfg(*extra):
    return config.load(
        None,
        [
            "generate.group_size=4",
            "generate.max_new_tokens=8",
            f"update.lora_r={R}",
            f"update.lora_alpha={ALPHA}",
            "update.lr=0.01",
            "update.minibatches=2",
            "update.micro_batch_size=8",
            "update.device=cpu",
            *extra,
        ],
    )


def run_update(cfg, units, policy, reference, out, iteration=0):
    out.mkdir(parents=True)
    log = []
    res = update.run(
        {"units": units, "policy": policy, "reference": reference},
        out,
        cfg,
        runner.Context(iteration=iteration, log=log.append),
    )
    return res, log


def weights(folder):
    return load_file(folder / "model.safetensors")


def adapter_tensors(model_dir):
    """{module name: (A, B)} from the saved adapter_model.safetensors alone."""
    t = load_file(model_dir / "adapter" / "adapter_model.safetensors")
    out = {}
    for key, v in t.items():
        mod, _, which = key.removeprefix("base_model.model.").rpartition(".lora_")
        out.setdefault(mod, {})[which.split(".")[0]] = v
    return {m: (d["A"], d["B"]) for m, d in out.items()}


@pytest.fixture(scope="module")
def first(base_dir, units_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-it0")
    res, log = run_update(lora_cfg(), units_dir, base_dir, base_dir, out / "upd")
    return res, log, out / "upd" / "model"


def test_merged_weights_are_base_plus_scaled_b_a_and_the_rest_is_bit_identical(base_dir, first):
    """(a) Every adapted weight of the saved model equals W + (alpha/r) * B @ A computed
    here from the saved adapter's tensors (fp32, within 1e-6); embeddings, norms, lm_head
    and every non-adapted layer are bit-identical to the base."""
    res, _, model_dir = first
    base, merged = weights(base_dir), weights(model_dir)
    assert set(merged) == set(base)
    ab = adapter_tensors(model_dir)
    cfg = json.loads((model_dir / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (R, ALPHA)
    # all-linear: every attention and MLP projection of both layers, not the LM head.
    assert len(ab) == 2 * 7 and not any("lm_head" in m for m in ab)
    assert any(float(B.abs().max()) > 0 for _, B in ab.values()), "the adapter trained"
    for key, w in base.items():
        mod = key.removesuffix(".weight")
        if mod in ab:
            A, B = ab[mod]
            want = w.double() + (ALPHA / R) * (B.double() @ A.double())
            assert (merged[key].double() - want).abs().max() < 1e-6, key
        else:
            assert torch.equal(merged[key], w), key
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[name], base[name])
    m = res["metrics"]
    assert m["lora_r"] == R
    n_adapter = sum(A.numel() + B.numel() for A, B in ab.values())
    assert m["trainable_params"] == n_adapter


def test_only_adapter_parameters_train(base_dir, units_dir, tmp_path, monkeypatch):
    """(b) In memory: after the update, every base tensor equals the freshly loaded base,
    every base parameter has requires_grad False, the optimizer holds exactly the adapter
    parameters, and B moved away from its zero initialisation."""
    seen = {}
    real_save = lora.save

    def spy(model, folder):
        seen["model"] = model
        real_save(model, folder)

    monkeypatch.setattr(lora, "save", spy)
    real_adamw = torch.optim.AdamW

    def adamw(params, **kw):
        seen["params"] = list(params)
        return real_adamw(seen["params"], **kw)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    run_update(lora_cfg(), units_dir, base_dir, base_dir, tmp_path / "upd")
    model = seen["model"]
    fresh = load_policy(base_dir, torch.device("cpu")).state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    assert seen["params"] and all("lora_" in names[id(p)] for p in seen["params"])
    assert len(seen["params"]) == sum("lora_" in n for n in names.values())
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            continue
        assert not p.requires_grad, name
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(p.detach(), fresh[key]), f"base weight {key} changed"
    moved = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert max(float(p.detach().abs().max()) for p in moved) > 0


def test_second_iteration_resumes_adapter_optimizer_and_step(base_dir, units_dir, first, tmp_path):
    """(c) Iteration 1 starts from iteration 0's model/: the adapter it loads equals the
    saved one, the global step continues, and the optimizer state holds adapter-shaped
    tensors only (before and after)."""
    _, _, model_dir = first
    saved = adapter_tensors(model_dir)
    adapter_shapes = sorted(tuple(t.shape) for ab in saved.values() for t in ab)
    opt0 = torch.load(model_dir / update.OPTIMIZER_FILE)
    shapes0 = sorted(tuple(s["exp_avg"].shape) for s in opt0["state"].values())
    assert shapes0 == adapter_shapes
    step0 = json.loads((model_dir / update.STATE_FILE).read_text())
    assert step0["global_step"] == 2 and step0["lora"]["base"] == "reference"

    loaded = {}
    real_wrap = lora.wrap

    def spy(base, u, adapter_dir):
        model = real_wrap(base, u, adapter_dir)
        loaded["dir"] = adapter_dir
        loaded["tensors"] = {
            n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n
        }
        return model

    mp = pytest.MonkeyPatch()
    mp.setattr(lora, "wrap", spy)
    try:
        res, log = run_update(
            lora_cfg(), units_dir, model_dir, base_dir, tmp_path / "upd1", iteration=1
        )
    finally:
        mp.undo()
    assert loaded["dir"] == model_dir / "adapter"
    assert any("resuming" in line for line in log)
    for mod, (A, B) in saved.items():
        assert torch.equal(loaded["tensors"][f"base_model.model.{mod}.lora_A.default.weight"], A)
        assert torch.equal(loaded["tensors"][f"base_model.model.{mod}.lora_B.default.weight"], B)
    m = res["metrics"]
    assert m["global_step"] == 4 and m["optimizer_steps"] == 2
    steps = pq.read_table(tmp_path / "upd1" / "metrics.parquet").column("step").to_pylist()
    assert steps == [2, 3]
    out = tmp_path / "upd1" / "model"
    opt1 = torch.load(out / update.OPTIMIZER_FILE)
    assert sorted(tuple(s["exp_avg"].shape) for s in opt1["state"].values()) == adapter_shapes
    # Adam's step counter went on from iteration 0's (2 steps) to 4: the state was resumed.
    assert {int(s["step"]) for s in opt1["state"].values()} == {4}
    # The merged model of iteration 1 is the *reference* plus the resumed-and-trained adapter.
    base, merged, ab = weights(base_dir), weights(out), adapter_tensors(out)
    for mod, (A, B) in ab.items():
        want = base[f"{mod}.weight"].double() + (ALPHA / R) * (B.double() @ A.double())
        assert (merged[f"{mod}.weight"].double() - want).abs().max() < 1e-6


def test_full_policy_without_adapter_becomes_the_base_with_a_fresh_adapter(
    base_dir, units_dir, tmp_path, monkeypatch
):
    """A policy folder that is not the reference and holds no adapter (a fully fine-tuned
    model): it is the base, a fresh adapter starts, its optimizer state is not resumed, the
    step continues, and with beta > 0 the reference is loaded separately as the KL model."""
    full = tmp_path / "full"
    run_update(
        config.load(None, ["update.minibatches=2", "update.device=cpu", "update.lr=0.01"]),
        units_dir,
        base_dir,
        base_dir,
        full,
    )
    loads = []
    real = update.load_policy
    monkeypatch.setattr(update, "load_policy", lambda p, d, *a: loads.append(p) or real(p, d, *a))
    res, log = run_update(
        lora_cfg("update.beta=0.1"), units_dir, full / "model", base_dir, tmp_path / "u", 1
    )
    assert loads == [full / "model", base_dir]
    assert any("fresh adapter on the policy" in line for line in log)
    assert res["metrics"]["global_step"] == 4
    st = json.loads((tmp_path / "u" / "model" / update.STATE_FILE).read_text())
    assert st["lora"]["base"] == "policy"
    policy_w, merged = weights(full / "model"), weights(tmp_path / "u" / "model")
    for mod, (A, B) in adapter_tensors(tmp_path / "u" / "model").items():
        want = policy_w[f"{mod}.weight"].double() + (ALPHA / R) * (B.double() @ A.double())
        assert (merged[f"{mod}.weight"].double() - want).abs().max() < 1e-6
    assert torch.equal(merged["lm_head.weight"], policy_w["lm_head.weight"])


def test_kl_reference_is_the_disabled_adapter_and_no_second_model_loads(
    base_dir, units_dir, tmp_path, monkeypatch
):
    """(d) beta > 0 with LoRA on the reference: the first step's KL is 0 (B = 0 at init, so
    policy == reference), later steps' is positive, and load_policy runs once."""
    loads = []
    real = update.load_policy
    monkeypatch.setattr(update, "load_policy", lambda p, d, *a: loads.append(p) or real(p, d, *a))
    res, _ = run_update(
        lora_cfg("update.beta=0.5", "update.minibatches=3"),
        units_dir,
        base_dir,
        base_dir,
        tmp_path / "upd",
    )
    assert loads == [base_dir]
    kl = pq.read_table(tmp_path / "upd" / "metrics.parquet").column("kl").to_pylist()
    assert abs(kl[0]) < 1e-7
    assert kl[-1] > 0


def test_disabled_adapter_reference_equals_the_base_model(base_dir):
    """The reference wrapper gives the base model's logits even with a nonzero adapter,
    and leaves the adapter on (and train mode) afterwards."""
    u = lora_cfg().update
    model = lora.wrap(load_policy(base_dir, torch.device("cpu")), u, None)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = lora.DisabledAdapter(model)(input_ids=ids).logits
    base = load_policy(base_dir, torch.device("cpu"))(input_ids=ids).logits
    assert torch.equal(ref, base)
    assert model.training
    assert not torch.allclose(model(input_ids=ids).logits, base)


@pytest.mark.parametrize(
    "targets, said",
    [
        ("[q_proj,qq_proj]", "'qq_proj' matches no Linear layer"),
        ("[lm_head]", "is the LM head"),
        ("[all-linear,q_proj]", "give it alone"),
    ],
)
def test_bad_target_module_is_a_clear_error(base_dir, units_dir, tmp_path, targets, said):
    """(e) The error is an EqLenError (exit code 2) naming the key and the model's Linear
    layers."""
    cfg = lora_cfg(f"update.lora_target_modules={targets}")
    with pytest.raises(lora.LoraTargetError) as e:
        run_update(cfg, units_dir, base_dir, base_dir, tmp_path / "upd")
    msg = str(e.value)
    assert isinstance(e.value, EqLenError)
    assert "update.lora_target_modules" in msg and said in msg
    if "no Linear" in said:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert name in msg


def test_named_targets_adapt_only_those_layers(base_dir):
    model = load_policy(base_dir, torch.device("cpu"))
    got = lora.resolve_targets(model, ["q_proj", "v_proj"])
    assert got == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")
    )
    assert "lm_head" not in lora.resolve_targets(model, ["all-linear"])


def test_saved_model_loads_with_from_pretrained_and_differs_from_the_base(base_dir, first):
    """(f) model/ is a plain HF checkpoint (from_pretrained, the tokenizer next to it) whose
    outputs differ from the base's; the adapter sits in model/adapter/."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, model_dir = first
    assert (model_dir / "adapter" / "adapter_config.json").is_file()
    assert (model_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (model_dir / update.OPTIMIZER_FILE).is_file()
    assert not any("lora" in k for k in weights(model_dir))
    AutoTokenizer.from_pretrained(model_dir)
    trained = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a, b = trained(input_ids=ids).logits, base(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-4


def test_peft_enters_the_key_only_with_lora():
    plain = update.STAGE.key_parts(config.load(None, []), {}, 0)["packages"]
    with_lora = update.STAGE.key_parts(config.load(None, ["update.lora_r=8"]), {}, 0)["packages"]
    assert "peft" not in plain and "peft" in with_lora


def test_update_shows_a_progress_bar_over_optimizer_steps(
    base_dir, units_dir, tmp_path, monkeypatch
):
    """The bar counts epochs x minibatches optimizer steps, under the stage's name; the
    per-step log lines stay."""
    from pipeline import progress

    bars = []
    real = progress.bar

    def spy(total, desc, unit, ctx=None):
        b = real(total, desc, unit, ctx)
        counted = []
        b.update = lambda k=1: counted.append(k)  # a disabled bar (no terminal) counts nothing
        bars.append((total, desc, unit, counted))
        return b

    monkeypatch.setattr(progress, "bar", spy)
    _, log = run_update(
        lora_cfg("update.epochs=2", "update.minibatches=3"),
        units_dir,
        base_dir,
        base_dir,
        tmp_path / "upd",
    )
    (total, desc, unit, counted) = bars[0]
    assert (total, desc, unit, sum(counted)) == (6, "update", "step", 6)
    assert sum(line.startswith("  update: step") for line in log) == 6
