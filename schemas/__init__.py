"""Arrow schemas of the datasets the stages exchange, with every column documented.

Four datasets flow through the pipeline (docs/method.md, "Interfaces"):

    prompts --generate--> rollouts --score--> scored --pair--> units --update--> policy

Each is a Parquet file in a stage output folder. A `Schema` lists its required columns
(more may be present: prompt columns such as `answer` are carried through to the reward
functions, as TRL passes dataset columns). `validate` checks a table against a schema and
fails with a `SchemaError` naming the file, the column, the row and what to do.

Length relations of list columns are part of the contract and checked:
- rollouts: `len(logprobs) == len(response_ids)`, `0 <= own_start < len(response_ids)`;
- units: `len(segment_ids) == len(old_logprobs) == len(loss_mask) == segment_len`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import EqLenError


class SchemaError(EqLenError, ValueError):
    """A dataset that does not match its schema; the message names file, column and row."""


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    doc: str
    nullable: bool = False
    len_of: str | None = None  # list column: per-row length equals this int column / list column
    # Other types the column may have instead (the prompt: text, or chat messages).
    alt: tuple[pa.DataType, ...] = ()


@dataclass(frozen=True)
class Schema:
    name: str
    columns: tuple[Column, ...]
    doc: str

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def arrow(self, extra: pa.Schema | None = None) -> pa.Schema:
        fields = [pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns]
        if extra is not None:
            names = {c.name for c in self.columns}
            fields += [f for f in extra if f.name not in names]
        return pa.schema(fields)


I32, I64, F32, F64, STR = pa.int32(), pa.int64(), pa.float32(), pa.float64(), pa.string()
IDS = pa.list_(I32)
# A conversational prompt, TRL's format: a list of {"role", "content"} messages.
MESSAGE = pa.struct([("role", STR), ("content", STR)])
CHAT = pa.list_(MESSAGE)


def is_chat(t: pa.DataType) -> bool:
    """Whether a `prompt` column holds conversations (lists of messages), not text."""
    return pa.types.is_list(t) or pa.types.is_large_list(t)


PROMPTS = Schema(
    "prompts",
    (
        Column(
            "prompt_id",
            STR,
            "Unique id of the prompt (generated from the row number when the source has none).",
        ),
        Column(
            "prompt",
            STR,
            "Prompt text, tokenized by the policy's tokenizer (with the special tokens it "
            "adds); or a conversation, a list of {role, content} messages (TRL's "
            "conversational format), rendered by the tokenizer's chat template with the "
            "generation prompt.",
            alt=(CHAT,),
        ),
    ),
    "One row per prompt. Other columns (e.g. `answer`) are kept and passed to reward functions.",
)

ROLLOUTS = Schema(
    "rollouts",
    (
        Column("prompt_id", STR, "Id of the prompt this track answers."),
        Column("prompt", STR, "Prompt text, or its messages (as in prompts).", alt=(CHAT,)),
        Column("iteration", I32, "Online iteration that generated the track."),
        Column(
            "prompt_ids", IDS, "Token ids of the prompt (the context c_0 of every round-0 track)."
        ),
        Column(
            "pair_id",
            I64,
            "Id of the pair, unique in the dataset; a prompt has group_size/2 pairs.",
        ),
        Column("track_id", I64, "Id of the track, unique in the dataset."),
        Column(
            "parent_track_id",
            I64,
            "Track whose prefix this track inherited (the survivor); null for round-0 tracks.",
            nullable=True,
        ),
        Column(
            "birth_round",
            I32,
            "Round in which the track was born: 0 for the pair's first two "
            "tracks, k for a track that inherited at the start of round k.",
        ),
        Column(
            "own_start",
            I32,
            "Index in `response_ids` where the track's own tokens begin; "
            "tokens before it were inherited (0 for round-0 tracks).",
        ),
        Column(
            "response_ids",
            IDS,
            "Whole response token ids after the prompt: inherited prefix, "
            "then own tokens, ending with EOS unless finish_reason is "
            "`length`. Length <= max_new_tokens.",
        ),
        Column(
            "logprobs",
            pa.list_(F32),
            "Sampling log-prob of each response token under the "
            "temperature-scaled policy; inherited tokens carry the "
            "survivor's values.",
            len_of="response_ids",
        ),
        Column("finish_reason", STR, "`eos` (ended by EOS) or `length` (hit max_new_tokens)."),
        Column(
            "response",
            STR,
            "Decoded response text (special tokens skipped): what reward "
            "functions see as a completion.",
        ),
    ),
    "One row per completed track.",
)

SCORED = Schema(
    "scored",
    ROLLOUTS.columns + (Column("reward", F64, "Weighted sum of the reward functions; never NaN."),),
    "Rollouts plus `reward` and one `reward_<function>` column per reward function.",
)

UNITS = Schema(
    "units",
    (
        Column("unit_id", I64, "Id of the comparison unit, unique in the dataset."),
        Column("prompt_id", STR, "Prompt the unit's members answer."),
        Column("strategy", STR, "Pair strategy that built the unit: group, truncate or eqlen."),
        Column("track_id", I64, "Track (rollouts row) this member's segment is cut from."),
        Column("round", I32, "Round of the unit (0 for group and truncate)."),
        Column("member", I32, "Position of the member in its unit (0..unit_size-1)."),
        Column(
            "unit_size", I32, "Members in the unit: group_size for group, 2 for pair strategies."
        ),
        Column("offset", I32, "Start of the segment within the track's `response_ids`."),
        Column("segment_len", I32, "Tokens in the segment."),
        Column(
            "context_ids",
            IDS,
            "Token ids the segment is conditioned on: the prompt plus the "
            "track's response before `offset`.",
        ),
        Column(
            "segment_ids",
            IDS,
            "Token ids of the segment: response_ids[offset:offset+segment_len].",
            len_of="segment_len",
        ),
        Column(
            "old_logprobs",
            pa.list_(F32),
            "Sampling log-probs of the segment's tokens.",
            len_of="segment_len",
        ),
        Column(
            "loss_mask",
            pa.list_(pa.bool_()),
            "True where the token enters the loss.",
            len_of="segment_len",
        ),
        Column("reward", F64, "Reward of the member's whole track."),
        Column("advantage", F64, "Default advantage of the member (strategy's estimator)."),
        Column("response_len", I32, "Length of the member's whole response (diagnostics)."),
        Column("finish_reason", STR, "Finish reason of the member's track."),
    ),
    "One row per unit member; self-contained, so a units dataset can be reused.",
)

ALL = {s.name: s for s in (PROMPTS, ROLLOUTS, SCORED, UNITS)}


def _fail(path: str | Path | None, column: str | None, row: int | None, what: str, todo: str):
    where = [f"file {path}" if path else "dataset"]
    if column is not None:
        where.append(f"column '{column}'")
    if row is not None:
        where.append(f"row {row}")
    raise SchemaError(f"{', '.join(where)}: {what}. {todo}")


def _type_ok(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual.equals(expected):
        return True
    # Accept what Parquet writers commonly produce for the same values.
    if pa.types.is_integer(expected) and pa.types.is_integer(actual):
        return True
    if pa.types.is_floating(expected) and (
        pa.types.is_floating(actual) or pa.types.is_integer(actual)
    ):
        return True
    if pa.types.is_string(expected) and (
        pa.types.is_large_string(actual) or pa.types.is_string_view(actual)
    ):
        return True
    if pa.types.is_list(expected) and (pa.types.is_list(actual) or pa.types.is_large_list(actual)):
        return _type_ok(actual.value_type, expected.value_type)
    if pa.types.is_struct(expected) and pa.types.is_struct(actual):
        want = {f.name: f.type for f in expected}
        have = {f.name: f.type for f in actual}
        return want.keys() == have.keys() and all(_type_ok(have[n], t) for n, t in want.items())
    return False


def _target(schema: Schema, table: pa.Table) -> pa.Schema:
    """The schema's types, with an alternative type where the table's column has that one."""
    fields = []
    for c in schema.columns:
        actual = table.schema.field(c.name).type
        t = next((a for a in c.alt if _type_ok(actual, a)), None)
        t = c.type if t is None or _type_ok(actual, c.type) else t
        fields.append(pa.field(c.name, t, nullable=c.nullable))
    return pa.schema(fields)


def validate(table: pa.Table, schema: Schema, path: str | Path | None = None) -> pa.Table:
    """Check `table` against `schema`; return it cast to the schema's column types."""
    if table.num_rows == 0:
        _fail(
            path,
            None,
            None,
            f"the {schema.name} dataset is empty",
            "Check the stage that produced it (or the prompt source) and rerun it.",
        )
    names = set(table.column_names)
    for col in schema.columns:
        if col.name not in names:
            _fail(
                path,
                col.name,
                None,
                f"missing column required by the {schema.name} schema "
                f"(present: {', '.join(table.column_names)})",
                f"Add it ({col.doc}) or regenerate the dataset with this version.",
            )
        arr = table.column(col.name)
        if not (
            _type_ok(arr.type, col.type)
            or any(_type_ok(arr.type, t) for t in col.alt)
            or (col.nullable and pa.types.is_null(arr.type))
        ):
            _fail(
                path,
                col.name,
                None,
                f"has type {arr.type}, expected {' or '.join(map(str, (col.type, *col.alt)))}",
                "Write the column with the expected type.",
            )
        if not col.nullable and arr.null_count:
            row = pc.index(pc.is_null(arr), True).as_py()
            _fail(path, col.name, row, "is null", "Every row needs a value in this column.")
        if (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) and (
            flat := pc.list_flatten(arr)
        ).null_count:
            k = pc.index(pc.is_null(flat), True).as_py()
            ends = np.cumsum(pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False))
            _fail(
                path,
                col.name,
                int(np.searchsorted(ends, k, side="right")),
                "holds a null inside its list",
                "Every value of the list needs to be set; regenerate the row.",
            )
        if pa.types.is_floating(col.type) and arr.null_count < len(arr):
            nan = pc.is_nan(arr.cast(F64))
            if pc.any(nan).as_py():
                _fail(
                    path,
                    col.name,
                    pc.index(nan, True).as_py(),
                    "is NaN",
                    "Fix the function or data that produced it; NaN cannot be trained on.",
                )
    cast = table.select([c.name for c in schema.columns]).cast(_target(schema, table))
    for col in schema.columns:
        if col.len_of is None:
            continue
        lens = pc.list_value_length(cast.column(col.name))
        ref = cast.column(col.len_of)
        if pa.types.is_list(ref.type):
            ref = pc.list_value_length(ref)
        bad = pc.not_equal(lens.cast(I64), ref.cast(I64))
        if pc.any(bad).as_py():
            row = pc.index(bad, True).as_py()
            _fail(
                path,
                col.name,
                row,
                f"has {lens[row].as_py()} values but '{col.len_of}' says {ref[row].as_py()}",
                "The two must describe the same tokens; regenerate the row.",
            )
    rest = [c for c in table.column_names if c not in {c.name for c in schema.columns}]
    out = cast
    for name in rest:
        out = out.append_column(table.schema.field(name), table.column(name))
    return out


def check_finite(values, path: str | Path | None, column: str) -> None:
    """Raise naming the first row whose value is NaN or infinite."""
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            _fail(
                path,
                column,
                i,
                f"is {v!r}",
                "Reward functions must return a finite float for every completion.",
            )


def describe_markdown() -> str:
    """The column reference of docs/schemas.md, generated from the schemas above."""
    out = []
    for s in ALL.values():
        out.append(f"## {s.name}\n\n{s.doc}\n\n| column | type | meaning |\n|---|---|---|")
        for c in s.columns:
            extra = f" Length = `{c.len_of}`." if c.len_of else ""
            null = " Nullable." if c.nullable else ""
            types = " or ".join(f"`{t}`" for t in (c.type, *c.alt))
            out.append(f"| `{c.name}` | {types} | {c.doc}{extra}{null} |")
        out.append("")
    return "\n".join(out)
