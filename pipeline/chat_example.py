"""A GSM8K-style chat example that runs here, offline: word problems in chat form, a tiny
local chat model, and a config that uses what a real run uses.

`eqlen example chat OUT` writes

    OUT/model/        a tiny Llama (random init, 0.2M parameters) with the demo's
                      byte-level tokenizer and a chat template, saved with save_pretrained
    OUT/train.jsonl   word problems, one per line, in TRL's conversational format:
                      {"prompt": [{"role": "user", "content": "..."}], "answer": "#### 7"}
    OUT/test.jsonl    held-out problems of the same kind (other numbers and names)
    OUT/config.yaml   chat prompts with a system prompt, `math_verify` + `boxed_format`
                      rewards, LoRA, held-out eval every iteration, TensorBoard

so that `eqlen run --config OUT/config.yaml` exercises the whole real-model path end to end
(the chat template, math answer checking, LoRA, avg@k / pass@k, tracking, export) in a
minute on a CPU. The model is untrained: it shows the plumbing, not learning; point
`model` at a real instruct model (a folder or a hub id) and `data.prompts` at real data
for that (configs/ holds recipes). The answers follow GSM8K's `#### N` convention, which
the `math_verify` reward understands.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# A minimal ChatML-like template: the markers are plain text, which the byte-level
# tokenizer encodes, so any message renders.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SYSTEM_PROMPT = "Solve it. Put the answer in \\boxed{}."
NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo")
THINGS = ("pens", "apples", "cards", "shells", "coins", "books")


def make_problem(rng: random.Random) -> dict:
    """One short word problem (add or take away) with its GSM8K-style answer."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 40), rng.randint(1, 20)
    if rng.random() < 0.5:
        text, answer = f"{name} has {a} {thing} and gets {b} more. How many now?", a + b
    else:
        a = max(a, b + 1)
        text, answer = f"{name} has {a} {thing} and gives away {b}. How many left?", a - b
    return {"prompt": [{"role": "user", "content": text}], "answer": f"#### {answer}"}


def write_problems(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt_id": f"q{seed}-{i:05d}", **make_problem(rng)}) + "\n")


def build_chat_model(out: Path, seed: int = 0) -> Path:
    """A tiny random Llama with the demo tokenizer and CHAT_TEMPLATE, in `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.demo import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 192
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention needs head_dim >= 32
        max_position_embeddings=192,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def warm_start(model_dir: Path, steps: int = 100, seed: int = 0) -> dict:
    """A short supervised warm start, so RL has something to sharpen: the model learns to
    answer `\\boxed{N}` then EOS, with N right half of the time (off by 1-3 otherwise),
    on problems rendered by the chat template with the example's system prompt. Returns
    the final loss. Seconds on a CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        seqs, starts = [], []
        for _ in range(16):
            p = make_problem(rng)
            n = int(p["answer"].removeprefix("#### "))
            if rng.random() < 0.5:
                n += rng.choice((-3, -2, -1, 1, 2, 3))
            msgs = [{"role": "system", "content": SYSTEM_PROMPT}, *p["prompt"]]
            ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"])
            target = tok(f"\\boxed{{{n}}}", add_special_tokens=False)["input_ids"]
            seqs.append(ids + target + [tok.eos_token_id])
            starts.append(len(ids))
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), tok.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (seq, start) in enumerate(zip(seqs, starts)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, start : len(seq)] = torch.tensor(seq[start:])  # the response only
            mask[i, : len(seq)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(model_dir)
    return {"loss": float(loss.detach())}


def config_text(out: Path) -> str:
    return f"""\
# The chat example (eqlen example chat): swap `model` for an instruct model's folder or hub
# id and `data.prompts` / `eval.data` for real data (see configs/ for recipes).
model: {out / "model"}
iterations: 2
data:
  prompts: {out / "train.jsonl"}
  system_prompt: {json.dumps(SYSTEM_PROMPT)}
  prompts_per_iteration: 8
  max_prompt_tokens: 128
generate:
  group_size: 4
  max_new_tokens: 24
score:
  reward_funcs: [math_verify, boxed_format]
  reward_weights: [1.0, 0.1]
update:
  lr: 1.0e-3
  minibatches: 2
  lora_r: 8
  lora_alpha: 16
eval:
  every: 1
  data: {out / "test.jsonl"}
  k: 4
  max_prompts: 8
log:
  to: [tensorboard]
"""


def write_example(out: str | Path, train: int = 256, test: int = 32) -> Path:
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    warm_start(build_chat_model(out / "model"))
    write_problems(out / "train.jsonl", train, seed=1)
    write_problems(out / "test.jsonl", test, seed=2)
    (out / "config.yaml").write_text(config_text(out))
    return out
