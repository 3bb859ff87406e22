"""Schema validation names the file, the column and the row of bad input."""

import pyarrow as pa
import pytest

import schemas
from schemas import SchemaError


def rollouts(**over):
    base = {
        "prompt_id": ["a", "a"],
        "prompt": ["rev 1=", "rev 1="],
        "iteration": [0, 0],
        "prompt_ids": [[1, 2], [1, 2]],
        "pair_id": [0, 0],
        "track_id": [0, 1],
        "parent_track_id": [None, None],
        "birth_round": [0, 0],
        "own_start": [0, 0],
        "response_ids": [[5, 1], [6, 7, 1]],
        "logprobs": [[-0.1, -0.2], [-0.3, -0.4, -0.5]],
        "finish_reason": ["eos", "eos"],
        "response": ["1", "23"],
    }
    base.update(over)
    return pa.table(base)


def test_valid_table_is_cast_to_schema_types_and_keeps_extra_columns():
    t = schemas.validate(rollouts(answer=["1", "1"]), schemas.ROLLOUTS, "r.parquet")
    assert t.schema.field("track_id").type == pa.int64()
    assert t.schema.field("logprobs").type == pa.list_(pa.float32())
    assert t.column("answer").to_pylist() == ["1", "1"]


@pytest.mark.parametrize(
    "over, pattern",
    [
        (
            {"logprobs": [[-0.1, -0.2], [-0.3]]},
            r"file r.parquet, column 'logprobs', row 1: has 1 values but 'response_ids' says 3",
        ),
        ({"track_id": [0, None]}, r"column 'track_id', row 1: is null"),
        ({"finish_reason": [1, 2]}, r"column 'finish_reason': has type int64, expected string"),
    ],
)
def test_bad_rows_are_named(over, pattern):
    with pytest.raises(SchemaError, match=pattern):
        schemas.validate(rollouts(**over), schemas.ROLLOUTS, "r.parquet")


def test_missing_column_and_empty_and_nan():
    with pytest.raises(SchemaError, match=r"column 'own_start': missing column"):
        schemas.validate(rollouts().drop_columns(["own_start"]), schemas.ROLLOUTS, "r.parquet")
    with pytest.raises(SchemaError, match="is empty"):
        schemas.validate(rollouts().slice(0, 0), schemas.ROLLOUTS, "r.parquet")
    scored = rollouts().append_column("reward", pa.array([1.0, float("nan")]))
    with pytest.raises(SchemaError, match=r"column 'reward', row 1: is NaN"):
        schemas.validate(scored, schemas.SCORED, "s.parquet")


def test_every_column_is_documented():
    for s in schemas.ALL.values():
        for c in s.columns:
            assert len(c.doc) > 10, (s.name, c.name)
    assert "| `segment_ids` |" in schemas.describe_markdown()
