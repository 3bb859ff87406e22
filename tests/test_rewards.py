"""The built-in rewards (math_verify, boxed_format, both completion forms), TRL's
conversational reward contract through the real score stage, and local reward models
(a tiny real LlamaForSequenceClassification) with their errors and cache key."""

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import schemas
from flows import runner
from pipeline import cache, config
from pipeline.errors import EqLenError
from pipeline.stage import ConfigView
from stages import rewards, score

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "pipeline" / "demo_assets" / "model"
CHAT = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


# ------------------------------------------------------------------ math_verify

MATH_CASES = [
    # (completion, answer, reward) -- worked by hand
    (r"so the answer is \boxed{\frac{1}{2}}", "0.5", 1.0),  # 1/2 = 0.5
    (r"\boxed{2x+2}", "2(x+1)", 1.0),  # 2(x+1) expands to 2x+2
    (r"\boxed{x+1}", "2(x+1)", 0.0),  # off by a factor 2
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),  # rationalised denominator
    (r"$\frac{3}{4}$", "0.75", 1.0),
    (r"\boxed{0.5}", r"$\frac{1}{2}$", 1.0),  # gold with its own delimiters
    (r"\boxed{50\%}", "0.5", 1.0),  # 50% = 0.5
    (r"\boxed{2}", "2.0", 1.0),
    (r"\boxed{0.333}", r"\frac{1}{3}", 0.0),  # 0.333 != 0.3333333 at 6 decimals
    (r"\boxed{-3}", "3", 0.0),
    ("First 3, then the answer is 7", "7", 1.0),  # the last number is the answer
    ("First 3, then the answer is 7", "3", 0.0),
    ("I do not know", "5", 0.0),
    ("", "5", 0.0),
    # GSM8K: the answer column is the worked solution, the gold after `####`.
    (
        "She sold 72 clips",
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips in all.\n#### 72",
        1.0,
    ),
    (r"\boxed{24}", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 0.0),  # 24 is not gold
    ("The answer is 1000.", "#### 1,000", 1.0),  # thousands separator after the marker
    # A gold answer that does not parse scores 0.0, even for the identical text.
    (r"\frac{1}{", r"\frac{1}{", 0.0),
    ("5", "#### ", 0.0),
    ("5", "", 0.0),
]


@pytest.mark.parametrize("completion, answer, expected", MATH_CASES)
def test_math_verify_hand_picked_cases(completion, answer, expected):
    assert rewards.math_verify_reward([completion], answer=[answer]) == [expected]


def test_math_verify_batch_repeated_gold_and_worker_thread():
    """Many rows sharing a gold (a prompt's group), and a call off the main thread (a Prefect
    task's worker), where math-verify's signal-based timeouts would raise: they are off there."""
    comps = [r"\boxed{\frac{1}{2}}", "0.5", r"\boxed{1/3}", "1/2"]
    want = [1.0, 1.0, 0.0, 1.0]
    assert rewards.math_verify_reward(comps, answer=["0.5"] * 4) == want
    got = {}
    t = threading.Thread(
        target=lambda: got.update(v=rewards.math_verify_reward(comps, answer=["0.5"] * 4))
    )
    t.start()
    t.join(60)
    assert got["v"] == want


def test_gold_text():
    assert rewards.gold_text("#### 1,234") == "$1234$"
    assert rewards.gold_text("a\n#### 2 #### 72 ") == "$72$"  # after the last marker
    assert rewards.gold_text(r"$\frac12$") == r"$\frac12$"  # its own delimiters kept
    assert rewards.gold_text(r"\boxed{3}") == r"\boxed{3}"
    assert rewards.gold_text("  ") == ""


# ------------------------------------------------------------------ boxed_format

BOXED_CASES = [
    (r"\boxed{42}", 1.0),
    (r"so \boxed{\frac{1}{2}} is it", 1.0),  # nested braces balance
    (r"\boxed {7}", 1.0),  # a space before the group
    (r"\boxed{\{1, 2\}}", 1.0),  # escaped braces are not braces
    ("no box at all: 42", 0.0),
    (r"\boxed{}", 0.0),  # empty
    (r"\boxed{   }", 0.0),  # blank
    (r"\boxed{1} or \boxed{2}", 0.0),  # two
    (r"\boxed{\boxed{1}}", 0.0),  # nested: two commands
    (r"\boxed{1", 0.0),  # never closes
    (r"\boxed{\frac{1}{2}", 0.0),  # one brace short
    (r"\boxed 7", 0.0),  # no group
    (r"\boxedx{1}", 0.0),  # another command
]


@pytest.mark.parametrize("completion, expected", BOXED_CASES)
def test_boxed_format(completion, expected):
    assert rewards.boxed_format([completion]) == [expected]


def test_builtins_take_conversational_completions():
    texts = [r"\boxed{\frac{1}{2}}", " 12 ", "the answer is 7", r"\boxed{3} \boxed{4}"]
    answers = ["0.5", "12", "7", "3"]
    conv = [[{"role": "assistant", "content": t}] for t in texts]
    assert rewards.as_completions(texts, True) == conv
    for fn, want in [
        (rewards.exact_match, [0.0, 1.0, 0.0, 0.0]),
        (rewards.numeric_match, [0.0, 1.0, 1.0, 0.0]),  # last numbers 2, 12, 7, 4
        (rewards.math_verify_reward, [1.0, 1.0, 1.0, 0.0]),  # the last box, 4, is taken
        (rewards.boxed_format, [1.0, 0.0, 0.0, 0.0]),
    ]:
        assert fn(conv, answer=answers) == want, fn.__name__
        assert fn(texts, answer=answers) == want, fn.__name__  # the same on plain strings
    assert rewards.completion_text(conv[0]) == texts[0]


# ------------------------------------------------------------------ the score stage

PROMPTS = [
    [{"role": "system", "content": "Answer in a box."}, {"role": "user", "content": "1/2?"}],
    [{"role": "system", "content": "Answer in a box."}, {"role": "user", "content": "1/2?"}],
    [{"role": "user", "content": "rev 23="}],
]


def rollouts(prompts=None, responses=(r"\boxed{0.5}", "1/3", "32"), answers=("1/2", "1/2", "32")):
    n = len(responses)
    resp_ids = [[5, 1], [6, 7, 8, 1], [5, 1]][:n]
    prompt = pa.array(PROMPTS[:n], CHAT) if prompts is None else pa.array(prompts, pa.string())
    return pa.table(
        {
            "prompt_id": ["a", "a", "b"][:n],
            "prompt": prompt,
            "iteration": [0] * n,
            "prompt_ids": [[1], [1], [2]][:n],
            "pair_id": [0, 0, 1][:n],
            "track_id": list(range(n)),
            "parent_track_id": pa.array([None] * n, pa.int64()),
            "birth_round": [0] * n,
            "own_start": [0] * n,
            "response_ids": resp_ids,
            "logprobs": [[-0.1] * len(r) for r in resp_ids],
            "finish_reason": ["eos"] * n,
            "response": list(responses),
            "answer": list(answers),
        }
    )


def run_score(tmp_path, cfg, table, name="run"):
    """The real stage, through its declaration (ConfigView): as the runner calls it."""
    d = tmp_path / name / "rollouts"
    d.mkdir(parents=True)
    pq.write_table(table, d / "rollouts.parquet")
    out = tmp_path / name / "out"
    out.mkdir()
    view = ConfigView(cfg, score.STAGE.allowed(cfg), "score")
    res = score.STAGE.run({"rollouts": d}, out, view, runner.Context(iteration=None))
    return pq.read_table(out / "scored.parquet"), res


@pytest.fixture
def conv_module(tmp_path, monkeypatch):
    (tmp_path / "convrewards.py").write_text(
        textwrap.dedent("""
        SEEN = []
        def trl_style(completions, prompts, completion_ids, answer, **kw):
            SEEN.append((completions, prompts, completion_ids))
            # TRL's documented access: completion[0]["content"], prompt[-1]["content"].
            return [float(c[0]["content"] == "32") + len(p) for c, p in zip(completions, prompts)]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("convrewards", None)


def test_user_reward_gets_trls_conversational_form_through_the_stage(tmp_path, conv_module):
    cfg = config.load(
        None,
        [
            "score.reward_funcs=[convrewards:trl_style,math_verify,boxed_format]",
            "score.reward_weights=[1.0,2.0,0.5]",
        ],
    )
    t, res = run_score(tmp_path, cfg, rollouts())
    seen = sys.modules["convrewards"].SEEN
    assert len(seen) == 1
    completions, prompts, ids = seen[0]
    assert completions == [
        [{"role": "assistant", "content": r"\boxed{0.5}"}],
        [{"role": "assistant", "content": "1/3"}],
        [{"role": "assistant", "content": "32"}],
    ]
    assert prompts == PROMPTS
    assert ids == [[5, 1], [6, 7, 8, 1], [5, 1]]
    # trl_style: 0 + 2 messages, 0 + 2, 1 + 1; math_verify: 1, 0, 1; boxed: 1, 0, 0.
    assert t.column("reward_trl_style").to_pylist() == [2.0, 2.0, 2.0]
    assert t.column("reward_math_verify").to_pylist() == [1.0, 0.0, 1.0]
    assert t.column("reward_boxed_format").to_pylist() == [1.0, 0.0, 0.0]
    assert t.column("reward").to_pylist() == [2 + 2 + 0.5, 2.0, 2 + 2]
    assert t.column("prompt").to_pylist() == PROMPTS  # carried through as messages
    assert res["metrics"]["accuracy"] == 1.0  # every reward >= 1.0
    # The declaration: math_verify's packages are in the key, torch is not (no models).
    assert set(score.STAGE.packages(cfg)) == {"math-verify", "latex2sympy2_extended", "sympy"}


def test_preflight_placeholders_take_the_datas_form():
    prompts = pa.table({"prompt_id": ["p0", "p1"], "prompt": pa.array(PROMPTS[:2], CHAT)})
    completions, columns = score.placeholder_columns(prompts)
    assert completions == [[{"role": "assistant", "content": ""}]] * 2
    assert columns["prompts"] == PROMPTS[:2]

    def trl_style(completions, **kw):  # fails on strings: c[0] is "" there
        return [float(c[0]["content"] == "") for c in completions]

    score.check_reward("trl_style", trl_style, completions, columns)
    assert trl_style(completions) == [1.0, 1.0]
    text = pa.table({"prompt_id": ["p0"], "prompt": ["rev 1="]})
    assert score.placeholder_columns(text)[0] == [""]


# ------------------------------------------------------------------ reward models


def save_reward_model(folder: Path, *, chat_template=None, pad=True, num_labels=1, seed=0):
    """A tiny real LlamaForSequenceClassification with the demo tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(DEMO_TOKENIZER)
    if not pad:
        tok.pad_token = None
    if chat_template:
        tok.chat_template = chat_template
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-models")
    return {
        "plain": save_reward_model(root / "rm"),
        "chat": save_reward_model(root / "chat_rm", chat_template=TEMPLATE, pad=False, seed=1),
    }


def reference_scores(folder: Path, texts: list[str]) -> list[float]:
    """An independent forward pass: the saved model, one unpadded text at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt", add_special_tokens=False)
            out.append(float(model(**enc).logits[0, 0]))
    return out


def with_models(overrides, models, weights=None):
    cfg = config.load(None, overrides + [f"score.reward_models=[{','.join(map(str, models))}]"])
    if weights is not None:
        # pipeline/config.py still checks one weight per *function*; the stage's own check
        # (one per function, then one per model) is what is tested here.
        cfg.score.reward_weights = weights
    return cfg


def test_reward_model_column_equals_an_independent_forward_pass(tmp_path, rm_dirs):
    prompts = ["rev 12=", "rev 12=", "rev 345="]
    responses = ["21", "2 1 and some more", "543"]
    cfg = with_models(
        ["score.reward_funcs=[exact_match]", "score.reward_model_batch_size=2"],
        [rm_dirs["plain"]],
        weights=[1.0, 0.5],
    )
    t, res = run_score(tmp_path, cfg, rollouts(prompts, responses, answers=["21", "21", "543"]))
    want = reference_scores(rm_dirs["plain"], [p + r for p, r in zip(prompts, responses)])
    got = t.column("reward_rm").to_pylist()
    assert got == pytest.approx(want, abs=1e-5)  # batches of 2 and 1, padded on the right
    assert len(set(round(v, 6) for v in got)) == 3  # the texts are really told apart
    exact = [1.0, 0.0, 1.0]
    assert t.column("reward").to_pylist() == pytest.approx(
        [e + 0.5 * w for e, w in zip(exact, want)], abs=1e-5
    )
    names = t.column_names
    assert names.index("reward_exact_match") < names.index("reward_rm")  # models after functions
    assert res["metrics"]["reward_rm"] == pytest.approx(sum(want) / 3, abs=1e-5)
    assert set(score.STAGE.packages(cfg)) == {"torch", "transformers"}


def test_reward_model_on_conversations_uses_its_chat_template(tmp_path, rm_dirs, conv_module):
    """A tokenizer without a pad token (EOS pads), a chat template over the messages plus the
    assistant message; the user function sees TRL's form in the same run."""
    from transformers import AutoTokenizer

    folder = rm_dirs["chat"]
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    cfg = with_models(
        ["score.reward_funcs=[convrewards:trl_style]", "score.reward_model_batch_size=3"],
        [folder],
        weights=[0.0, 2.0],
    )
    responses = (r"\boxed{0.5}", "1/3", "32")
    t, _ = run_score(tmp_path, cfg, rollouts(responses=responses))
    tok = AutoTokenizer.from_pretrained(folder)
    texts = [
        tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
        for p, r in zip(PROMPTS, responses)
    ]
    assert texts[2] == "<s>user: rev 23=\n<s>assistant: 32\n"
    want = reference_scores(folder, texts)
    assert t.column("reward_chat_rm").to_pylist() == pytest.approx(want, abs=1e-5)
    assert t.column("reward").to_pylist() == pytest.approx([2 * w for w in want], abs=1e-5)
    # Without a chat template: the messages' contents, then the completion.
    plain = rewards.model_texts(object(), PROMPTS[2:], [[{"role": "assistant", "content": "32"}]])
    assert plain == ["rev 23=32"]


def test_reward_model_columns_are_unique():
    got = rewards.model_columns(
        ["/x/exact_match", "/y/rm", "/z/rm", "/w/my-rm"], taken={"reward_exact_match"}
    )
    assert got == {
        "/x/exact_match": "reward_exact_match_2",
        "/y/rm": "reward_rm",
        "/z/rm": "reward_rm_2",
        "/w/my-rm": "reward_my_rm",
    }
    with pytest.raises(rewards.RewardModelError, match="lists '/y/rm' more than once"):
        rewards.model_columns(["/y/rm", "/y/rm"], taken=set())


def key(cfg) -> str:
    return cache.cache_key(score.STAGE.key_parts(cfg, {"rollouts": "r"}, 0))


def test_reward_model_files_are_in_the_key_device_and_batch_size_are_not(tmp_path, rm_dirs):
    folder = tmp_path / "rm"
    shutil.copytree(rm_dirs["plain"], folder)
    base = ["score.reward_funcs=[exact_match]"]
    k0 = key(with_models(base, [folder]))
    assert key(with_models(base + ["score.device=cpu"], [folder])) == k0
    assert key(with_models(base + ["score.reward_model_batch_size=7"], [folder])) == k0
    assert key(config.load(None, base)) != k0  # with and without the model
    tc = folder / "tokenizer_config.json"
    tc.write_text(tc.read_text() + "\n")  # the same tokenizer, other bytes
    assert key(with_models(base, [folder])) != k0
    parts = score.STAGE.key_parts(with_models(base, [folder]), {"rollouts": "r"}, 0)
    assert parts["extra"]["reward_models"] == {str(folder): rewards.model_digest(folder)}
    assert "score.device" not in parts["config"] and "score.reward_models" in parts["config"]
    assert rewards.model_digest(tmp_path / "nowhere") == "missing"


def test_score_key_imports_neither_torch_nor_math_verify(rm_dirs):
    """A fully cached run computes score's key with reward models and math_verify set."""
    code = (
        "import sys; from pipeline import config; from stages import score;"
        f" c = config.load(None, ['score.reward_funcs=[math_verify]',"
        f" 'score.reward_models=[{rm_dirs['plain']}]']);"
        " score.STAGE.key_parts(c, {'rollouts': 'r'}, 0);"
        " bad = [m for m in sys.modules if m.split('.')[0] in"
        " ('torch', 'transformers', 'math_verify', 'sympy')]; print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, rm_dirs):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bad-reward-models")
    two = save_reward_model(root / "two_labels", num_labels=2)
    # A causal LM relabelled as a classifier: its score head would be random.
    headless = root / "headless"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=261,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(headless)
    shutil.copy(DEMO_TOKENIZER / "tokenizer.json", headless)
    shutil.copy(DEMO_TOKENIZER / "tokenizer_config.json", headless)
    c = json.loads((headless / "config.json").read_text())
    c["architectures"] = ["LlamaForSequenceClassification"]
    c["id2label"], c["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}  # one output
    (headless / "config.json").write_text(json.dumps(c))
    return {"two": two, "headless": headless, "causal": DEMO_TOKENIZER}


@pytest.mark.parametrize(
    "which, pattern",
    [
        ("missing", r"reward model .*nowhere does not exist; give the folder of a "),
        (
            "causal",
            r"model is not a sequence-classification model \(config.json "
            r"architectures: LlamaForCausalLM\).*num_labels=1",
        ),
        ("two", r"two_labels outputs 2 scores per row \(num_labels=2\), not one"),
        ("headless", r"headless: its weights lack score.weight, which would be random"),
    ],
)
def test_unusable_reward_models_fail_clearly(tmp_path, bad_models, which, pattern):
    folder = tmp_path / "nowhere" if which == "missing" else bad_models[which]
    cfg = with_models(["score.reward_funcs=[exact_match]"], [folder])
    with pytest.raises(rewards.RewardModelError, match=pattern) as e:
        run_score(tmp_path, cfg, rollouts(["rev 1="] * 3))
    assert isinstance(e.value, EqLenError)  # exit code 2 on the command line
    assert str(folder) in str(e.value)
    assert not (tmp_path / "run" / "out" / "scored.parquet").exists()


def test_reward_weights_count_functions_then_models(tmp_path, rm_dirs):
    cfg = with_models(["score.reward_funcs=[exact_match]"], [rm_dirs["plain"]], weights=[1.0])
    with pytest.raises(
        score.RewardError,
        match=r"score.reward_weights has 1 weights for 1 reward function and 1 reward model "
        r"\(exact_match, .*rm\); give one weight per function, then one per model",
    ):
        run_score(tmp_path, cfg, rollouts(["rev 1="] * 3))


def test_a_model_that_does_not_give_one_score_per_row(tmp_path, bad_models, monkeypatch):
    """The output check behind the config check: a model whose logits are not (rows, 1)."""
    monkeypatch.setattr(rewards, "check_model_folder", lambda folder: {})
    with pytest.raises(
        rewards.RewardModelError, match=r"returned logits of shape \(2, 2\) for 2 rows, not one"
    ):
        rewards.score_with_model(bad_models["two"], ["a", "b"], ["1", "2"], torch.device("cpu"), 4)


def test_schemas_accept_the_conversational_rollouts():
    """The stage relies on schemas accepting a list<struct<role, content>> prompt column."""
    t = schemas.validate(rollouts(), schemas.ROLLOUTS)
    assert rewards.is_conversational_type(t.schema.field("prompt").type)
    assert not rewards.is_conversational_type(pa.string())
