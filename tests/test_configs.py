"""The recipes in configs/: each loads and validates, its settings suit an LLM, and it runs
one real iteration (chat template, system prompt, math_verify, LoRA where set, held-out
eval) with only what cannot exist here swapped: the hub model and datasets for the tiny
local chat model and local JSONL files with the same columns, vLLM for the hf engine, and
the sizes for a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows import runner
from pipeline import chat_example, config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads_and_suits_an_llm(path):
    runner.load_stages()
    cfg = config.validate(config.load(path))
    assert cfg.model != "demo" and cfg.data.prompts != "demo"
    assert cfg.update.lr <= (1e-4 if cfg.update.lora_r else 1e-5)  # not the demo's 5e-4
    assert cfg.generate.max_new_tokens >= 256 and cfg.data.max_prompt_tokens >= 256
    assert "math_verify" in cfg.score.reward_funcs
    assert cfg.eval.every > 0 and cfg.eval.data and cfg.eval.split
    assert cfg.data.system_prompt and "boxed" in cfg.data.system_prompt


def stand_in_data(folder: Path, cfg) -> tuple[Path, Path]:
    """Local word problems under the recipe's own column names."""
    rows = []
    for i in range(6):
        a, b = i + 2, i + 3
        rows.append(
            {cfg.data.prompt_column: f"What is {a} + {b}?", cfg.data.answer_column: f"#### {a + b}"}
        )
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    for f, part in ((train, rows[:4]), (test, rows[4:])):
        f.write_text("".join(json.dumps(r) + "\n" for r in part))
    return train, test


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_runs_an_iteration_with_local_stand_ins(path, tmp_path):
    recipe = config.load(path)
    model = chat_example.build_chat_model(tmp_path / "model")
    train, test = stand_in_data(tmp_path, recipe)
    cfg = config.load(
        path,
        [
            f"model={model}",
            f"data.prompts={train}",
            f"eval.data={test}",
            "generate.engine=hf",
            "iterations=1",
            "data.prompts_per_iteration=2",
            "data.max_prompt_tokens=128",
            "generate.group_size=4",
            "generate.max_new_tokens=8",
            "update.minibatches=1",
            "eval.k=2",
            "eval.every=1",
            "eval.max_new_tokens=8",
            "log.to=[]",
        ],
    )
    history = runner.online(config.validate(cfg), tmp_path / "run", call=runner._direct)
    first = history[0]
    assert set(first) == {"eval", "generate", "score", "pair", "update"}
    assert first["update"].metrics["optimizer_steps"] == 1
    if recipe.update.lora_r:
        assert first["update"].metrics["lora_r"] == recipe.update.lora_r
    assert history[-1]["eval"].metrics["n_prompts"] == 2
