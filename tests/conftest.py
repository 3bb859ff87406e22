"""Shared fixtures: a tiny random policy, a materialised demo prompt set, a Prefect server.

Everything is real: a transformers Llama saved with save_pretrained, Parquet on disk, and
(for flow tests) a real Prefect API server started once per test session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def policy_dir() -> Path:
    """The shipped warm-started demo policy: a real transformers checkpoint whose responses
    end at varied lengths (a random model almost never emits EOS)."""
    from pipeline.demo import demo_model_dir

    return demo_model_dir()


@pytest.fixture
def make_cfg():
    from pipeline import config

    def make(*overrides: str, **kw):
        base = [
            "data.demo_size=64",
            "data.prompts_per_iteration=4",
            "generate.group_size=4",
            "generate.max_new_tokens=8",
            "iterations=2",
        ]
        return config.load(None, base + list(overrides))

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on loopback, shared by the flow and CLI tests."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    import urllib.request

    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}"
                ) from None
            time.sleep(0.5)
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    yield url
    if old is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = old
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama with the demo tokenizer, for update-math tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.demo import build_tokenizer

    out = tmp_path_factory.mktemp("random-model")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
