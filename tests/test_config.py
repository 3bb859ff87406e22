"""Config loading: YAML + --set, with errors that list the valid keys and values."""

import pytest

from flows.runner import load_stages
from pipeline import config
from pipeline.config import ConfigError

# The registries (strategies, loss aggregations, ...) are known once the stages are imported,
# as the command line does before it loads a config.
load_stages()


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("generate:\n  rounds: 4\n  temperature: 0.7\npair:\n  strategy: group\n")
    cfg = config.load(
        f,
        [
            "generate.group_size=6",
            "update.lr=1e-4",
            "score.reward_funcs=[exact_match,numeric_match]",
            "score.reward_weights=[1, 0.5]",
        ],
    )
    assert cfg.generate.rounds == 4 and cfg.generate.temperature == 0.7
    assert cfg.generate.group_size == 6 and cfg.update.lr == 1e-4
    assert cfg.score.reward_funcs == ["exact_match", "numeric_match"]
    assert cfg.score.reward_weights == [1.0, 0.5]
    # A recorded config (base) round-trips through to_dict.
    again = config.load(None, [], base=config.to_dict(cfg))
    assert again == cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("generate.bogus=1", "valid keys in 'generate': batch_tracks, device, engine"),
        ("nosuch=1", "valid keys at the top level:"),
        ("pair.strategy=zigzag", "valid values: group"),
        ("update.loss_agg=median", "valid values: seq_mean_token_mean, token_mean"),
        ("generate.group_size=3", "group_size must be even"),
        ("generate.group_size=two", "expected int, got 'two'"),
        ("generate=3", "'generate' is a section"),
        ("generate.rounds", "expects KEY=VALUE"),
        ("update.workers=2", "set cluster.ray_address"),
    ],
)
def test_bad_overrides_list_valid_choices(override, expected):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert expected in str(e.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("generate:\n  enginee: hf\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'generate.enginee'"):
        config.load(f)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")


def test_describe_covers_every_key():
    keys = {row[0] for row in config.describe()}
    for k in (
        "generate.engine",
        "generate.group_size",
        "generate.rounds",
        "generate.max_new_tokens",
        "generate.temperature",
        "pair.strategy",
        "update.algorithm",
        "update.loss_agg",
        "update.lr",
        "seed",
    ):
        assert k in keys
    assert all(row[3] for row in config.describe()), "every key is documented"


def test_generated_docs_are_current():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout


def test_config_imports_neither_torch_nor_the_stages():
    """The foundation floor: loading and validating a config needs no stage and no torch."""
    import subprocess
    import sys

    code = (
        "import sys; from pipeline import config; c = config.load(None, ['generate.rounds=4']);"
        " bad = [m for m in sys.modules if m == 'torch' or m.split('.')[0] in "
        "('stages', 'flows')]; print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_fsdp_with_lora_is_refused_before_any_stage():
    sets = ["cluster.ray_address=local", "update.workers=2", "update.lora_r=8"]
    with pytest.raises(ConfigError, match="use update.sharding=ddp with LoRA"):
        config.load(None, [*sets, "update.sharding=fsdp"])
    assert config.load(None, [*sets, "update.sharding=ddp"]).update.lora_r == 8
