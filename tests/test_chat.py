"""Chat prompts, dataset folders and hub ids, with the real loading code on local files.

Conversational prompts (TRL's format) are materialised as messages, rendered by the real
tokenizer's chat template in generate (so `prompt_ids` are the template's tokens), and a
tokenizer without a template is a clear error. `data.prompts` reads `datasets` folders
(split and subset), and `model` resolves a hub id through the local Hugging Face cache
(`huggingface_hub.snapshot_download`, offline), laid out here as the hub client lays it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import schemas
from flows import runner
from pipeline import chat_example, config, prompts
from pipeline.models import load_tokenizer
from stages import generate


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return chat_example.build_chat_model(tmp_path_factory.mktemp("chat-model"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(source, *overrides):
    return config.load(None, [f"data.prompts={source}", *overrides])


def test_conversations_are_materialised_as_messages_with_the_system_prompt(tmp_path):
    src = write_jsonl(
        tmp_path / "p.jsonl",
        [
            # field order and an extra field as other writers produce them
            {"prompt": [{"content": "1+1?", "role": "user", "name": "x"}], "sol": "2"},
            {
                "prompt": [{"role": "system", "content": "own"}, {"role": "user", "content": "3?"}],
                "sol": "3",
            },
        ],
    )
    cfg = cfg_for(src, "data.system_prompt=Be brief.", "data.answer_column=sol")
    table = pq.read_table(prompts.materialize(cfg, tmp_path / "cache") / "prompts.parquet")
    assert table.schema.field("prompt").type.equals(schemas.CHAT)
    assert table.column("prompt").to_pylist() == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
        [{"role": "system", "content": "own"}, {"role": "user", "content": "3?"}],
    ]
    assert table.column("answer").to_pylist() == ["2", "3"]  # data.answer_column -> answer
    # A text prompt with a system prompt becomes the conversation [system, user].
    src2 = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "hi", "answer": "1"}])
    t2 = prompts.load_table(cfg_for(src2, "data.system_prompt=S"))
    assert t2.column("prompt").to_pylist() == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    ]
    # Without one, text stays text.
    assert prompts.load_table(cfg_for(src2)).column("prompt").type == "string"


def test_the_system_prompt_is_in_the_prompts_key(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "q"}]}])
    a = prompts.materialize(cfg_for(src), tmp_path / "c")
    b = prompts.materialize(cfg_for(src, "data.system_prompt=S"), tmp_path / "c")
    assert a != b


@pytest.mark.parametrize(
    "message, expected",
    [
        ([], ("row 1", "an empty conversation")),
        ([{"role": "user"}], ("row 1", "is not")),
        # JSON's reader already refuses a column whose rows mix types, naming the column.
        ([{"role": "user", "content": 3}], ("column 'prompt'", "same type")),
    ],
)
def test_malformed_messages_are_clear_errors(tmp_path, message, expected):
    rows = [{"prompt": [{"role": "user", "content": "ok"}]}, {"prompt": message}]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(schemas.SchemaError) as e:
        prompts.load_table(cfg_for(src))
    assert all(x in str(e.value) for x in expected), e.value


def run_generate(tmp_path, cfg, policy, prompts_dir):
    out = tmp_path / "rollouts"
    out.mkdir()
    generate.run({"prompts": prompts_dir, "policy": policy}, out, cfg, runner.Context(iteration=0))
    return pq.read_table(out / "rollouts.parquet")


def test_generate_renders_conversations_with_the_chat_template(tmp_path, chat_model):
    src = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": [{"role": "user", "content": f"{i} + 1?"}], "answer": str(i + 1)}
            for i in range(3)
        ],
    )
    cfg = cfg_for(
        src,
        "data.system_prompt=Add.",
        "generate.group_size=2",
        "generate.max_new_tokens=4",
        "data.max_prompt_tokens=128",
    )
    prompts_dir = prompts.materialize(cfg, tmp_path / "cache")
    rollouts = run_generate(tmp_path, cfg, chat_model, prompts_dir)
    tok = load_tokenizer(chat_model)
    for conv, ids in zip(
        rollouts.column("prompt").to_pylist(), rollouts.column("prompt_ids").to_pylist()
    ):
        text = f"<|system|>Add.\n<|user|>{conv[1]['content']}\n<|assistant|>"
        assert conv[0] == {"role": "system", "content": "Add."}
        # The template's tokens, and nothing added around them.
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert schemas.is_chat(rollouts.schema.field("prompt").type)


def test_conversations_with_a_tokenizer_without_template_are_a_clear_error(tmp_path, policy_dir):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "q"}]}])
    cfg = cfg_for(src, "generate.group_size=2", "generate.max_new_tokens=2")
    prompts_dir = prompts.materialize(cfg, tmp_path / "cache")
    with pytest.raises(schemas.SchemaError, match="no chat template"):
        run_generate(tmp_path, cfg, policy_dir, prompts_dir)


def test_a_datasets_folder_with_splits_and_a_save_to_disk_folder(tmp_path):
    import datasets

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    write_jsonl(
        repo / "data" / "train.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(5)]
    )
    write_jsonl(repo / "data" / "test.jsonl", [{"question": "t", "answer": "9"}])
    cfg = cfg_for(repo, "data.prompt_column=question", "data.split=test")
    t = prompts.load_table(cfg)
    assert t.column("prompt").to_pylist() == ["t"] and t.column("answer").to_pylist() == ["9"]
    assert prompts.load_table(cfg_for(repo, "data.prompt_column=question")).num_rows == 5
    with pytest.raises(schemas.SchemaError, match="no split 'dev'.*train, test|no split 'dev'"):
        prompts.load_table(cfg_for(repo, "data.prompt_column=question", "data.split=dev"))
    # The split is in the prompts key.
    k1 = prompts.materialize(cfg, tmp_path / "c")
    k2 = prompts.materialize(cfg_for(repo, "data.prompt_column=question"), tmp_path / "c")
    assert k1 != k2

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"validation": datasets.Dataset.from_dict({"prompt": ["a", "b"], "answer": ["1", "2"]})}
    ).save_to_disk(saved)
    t = prompts.load_table(cfg_for(saved, "data.split=validation"))
    assert t.column("prompt").to_pylist() == ["a", "b"]


def test_a_flat_folder_of_parquet_files_is_still_one_table(tmp_path, make_cfg):
    import pyarrow as pa

    d = tmp_path / "pq"
    d.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"prompt": [f"p{i}"], "answer": [str(i)]}), d / f"{i}.parquet")
    assert prompts.load_table(cfg_for(d)).num_rows == 2


def _hf_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", **extra}


def test_a_hub_id_resolves_through_the_local_cache_offline(tmp_path, chat_model):
    # The hub client's cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-chat"
    shutil.copytree(chat_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from pipeline.models import resolve_model, load_tokenizer;"
        "p = resolve_model('tiny-org/tiny-chat'); print(p);"
        "print(load_tokenizer(p).chat_template is not None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_hf_env(tmp_path), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    path, has_template = out.stdout.split()
    assert path.endswith(f"snapshots/{commit}") and has_template == "True"

    # The same id through the CLI: eqlen eval of a hub id runs offline from the cache.
    held = write_jsonl(
        tmp_path / "held.jsonl",
        [{"prompt": [{"role": "user", "content": "1 + 1?"}], "answer": "2"}],
    )
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "eval",
            "tiny-org/tiny-chat",
            "--data",
            str(held),
            "--k",
            "2",
            "--max-new-tokens",
            "4",
            "--set",
            "data.max_prompt_tokens=128",
            "--run-dir",
            str(tmp_path / "ev"),
            "--json",
        ],
        env=_hf_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stdout.strip().splitlines()[-1])["n_prompts"] == 1


def test_an_uncached_hub_id_offline_is_a_clear_error(tmp_path):
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            "model=nobody/not-cached",
        ],
        env=_hf_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2, cli.stderr[-2000:]
    assert "HF_HUB_OFFLINE=1" in cli.stderr and "not in the local Hugging Face cache" in cli.stderr
