"""The update's columnar data path (stages/members.py) against plain Python references.

Each vectorised operation is checked row by row against the list it stands for, on the
awkward shapes (empty rows, one-token rows, sliced and chunked Arrow arrays, repeated and
unordered rows); `update.prepare` is checked against the first version's to_pylist path
on a units file the real pair stage wrote.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages import losses, update
from stages.members import Ragged, as_columns, from_table, gather_pad

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_data", ROOT / "benchmarks" / "bench_data.py")
bench_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_data)

rows_st = st.lists(st.lists(st.integers(0, 99), max_size=6), min_size=1, max_size=12)


def ref_pad(rows, value, width=None):
    width = max((len(r) for r in rows), default=0) if width is None else width
    return [list(r) + [value] * (width - len(r)) for r in rows]


@settings(max_examples=60, deadline=None)
@given(rows_st, st.data())
def test_take_pad_and_gather_pad_match_lists(rows, data):
    r = Ragged.from_lists(rows, dtype=np.int64)
    assert r.tolist() == rows and r.lengths.tolist() == [len(x) for x in rows]
    pick = data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=10))  # repeats, any order
    assert r.take(pick).tolist() == [rows[i] for i in pick]
    if pick:
        assert r.pad(-1, torch.long, rows=pick).tolist() == ref_pad([rows[i] for i in pick], -1)
        extra = data.draw(st.integers(0, 3))
        width = max(len(rows[i]) for i in pick) + extra
        got = r.pad(-1, torch.long, width=width, rows=pick).tolist()
        assert got == ref_pad([rows[i] for i in pick], -1, width)
    # Two parts concatenated row by row, straight from their sources.
    other = data.draw(
        st.lists(
            st.lists(st.integers(100, 199), max_size=4), min_size=len(rows), max_size=len(rows)
        )
    )
    o = Ragged.from_lists(other, dtype=np.int64)
    if pick:
        out, lens = gather_pad([r, o], pick, 0, np.int64)
        want = [rows[i] + other[i] for i in pick]
        assert out.tolist() == ref_pad(want, 0) and lens.tolist() == [len(w) for w in want]


def test_from_arrow_sliced_and_chunked():
    arr = pa.array([[1, 2], [], [3], [4, 5, 6], [7]], pa.list_(pa.int32()))
    chunked = pa.chunked_array([arr.slice(1, 3), arr.slice(4)])
    r = Ragged.from_arrow(chunked)
    assert r.tolist() == [[], [3], [4, 5, 6], [7]]
    assert Ragged.from_arrow(arr.slice(2, 2)).tolist() == [[3], [4, 5, 6]]
    assert r.to_arrow().to_pylist() == [[], [3], [4, 5, 6], [7]]


def test_where_rows_blanks_whole_rows_only():
    r = Ragged.from_lists([[True, True], [True], [], [True, False, True]])
    got = r.where_rows(np.array([False, True, True, True]), False)
    assert got.tolist() == [[True, True], [False], [], [False, False, False]]
    assert r.tolist()[1] == [True], "the source is not modified"


def test_segment_batch_matches_per_row_positions():
    """micro(): ids are context+segment, pos[j] = len(context)+j-1 predicts targets[j]."""
    ctx = [[5, 6, 7], [8], [9, 10]]
    seg = [[1], [2, 3, 4], [11, 12]]
    x = update.segment_batch(ctx, seg, pad_id=0)
    for a, b in ((0, 3), (1, 3), (0, 1), (2, 3)):
        m = update.micro(x, a, b)
        want_w = max(len(c) + len(s) for c, s in zip(ctx[a:b], seg[a:b]))
        assert m["ids"].shape[1] == want_w
        for k, (c, s) in enumerate(zip(ctx[a:b], seg[a:b])):
            seq = c + s
            assert m["ids"][k, : len(seq)].tolist() == seq
            assert m["attn"][k].tolist() == [1] * len(seq) + [0] * (want_w - len(seq))
            for j, tok in enumerate(s):
                p = int(m["pos"][k, j])
                assert p == len(c) + j - 1 and m["ids"][k, p + 1] == tok
                assert m["targets"][k, j] == tok


def test_micro_batches_cover_active_members_in_order_with_repeats(make_cfg):
    cols = as_columns(
        {
            "context_ids": [[1, 2]] * 5,
            "segment_ids": [[3]] * 2 + [[3, 4, 5]] * 3,
            "old_logprobs": [[-1.0]] * 2 + [[-2.0, -2.0, -2.0]] * 3,
            "advantage": [0.5, -0.5, 1.0, 0.0, 2.0],
        }
    )
    mb = np.array([4, 0, 2, 1, 3])
    active = np.array([0, 1, 3])
    got = list(update.micro_batches(cols, mb, active, size=2, count=4, pad_id=0, width=3))
    assert [g[0].tolist() for g in got] == [[0, 1], [3], [0], [0]]
    assert [g[1] for g in got] == [1.0, 1.0, 0.0, 0.0]
    assert got[0][2]["adv"].tolist() == [2.0, 0.5]
    assert got[0][2]["old"].tolist() == [[-2.0, -2.0, -2.0], [-1.0, 0.0, 0.0]]
    assert got[1][2]["targets"].tolist() == [[3]]


@pytest.fixture(scope="module")
def units_dir(tmp_path_factory):
    """A units file written by the real pair stage on synthetic eqlen rollouts."""
    return bench_data.make_units(tmp_path_factory.mktemp("units"), 3000, "eqlen", rounds=3)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("update.mask_truncated=true", "update.skip_zero_signal=false"),
        ("update.algorithm=rloo", "update.advantage=units"),
    ],
)
def test_prepare_equals_the_list_version(units_dir, make_cfg, overrides):
    cfg = make_cfg("pair.strategy=eqlen", "generate.rounds=3", *overrides)
    cols = update.prepare(units_dir, cfg)
    t = pq.read_table(units_dir / "units.parquet")
    ref = {c: t.column(c).to_pylist() for c in update.UNIT_COLUMNS}
    assert np.allclose(cols["advantage"], update.advantages(ref, cfg))
    for c in ("context_ids", "segment_ids", "old_logprobs"):
        assert cols[c].tolist() == ref[c]
    mask = [
        [False] * len(m) if cfg.update.mask_truncated and fr == "length" else m
        for m, fr in zip(ref["loss_mask"], ref["finish_reason"])
    ]
    assert cols["loss_mask"].tolist() == mask
    assert cols["strategy"].tolist() == ref["strategy"]
    # prompt_id becomes integer codes: the same grouping.
    codes = {}
    assert all(codes.setdefault(p, c) == c for p, c in zip(ref["prompt_id"], cols["prompt_id"]))
    assert len(set(codes.values())) == len(codes)
    if cfg.update.skip_zero_signal:
        assert cols["skip"].tolist() == losses.zero_signal(ref["reward"], ref["unit_id"]).tolist()


def test_from_table_reads_large_types():
    t = pa.table(
        {
            "a": pa.array([[1], [2, 3]], pa.large_list(pa.int64())),
            "s": pa.array(["x", "y"], pa.large_string()),
        }
    )
    cols = from_table(t, ["a", "s"])
    assert cols["a"].tolist() == [[1], [2, 3]] and cols["s"].tolist() == [0, 1]


def test_bench_data_counts_every_forwarded_token(units_dir, make_cfg):
    cfg = make_cfg("pair.strategy=eqlen", "generate.rounds=3", "update.micro_batch_size=7")
    got = bench_data.data_path(units_dir, cfg)
    t = pq.read_table(units_dir / "units.parquet")
    ref = {c: t.column(c).to_pylist() for c in update.UNIT_COLUMNS}
    skip = losses.zero_signal(ref["reward"], ref["unit_id"])
    lens = [len(c) + len(s) for c, s in zip(ref["context_ids"], ref["segment_ids"])]
    assert got["tokens"] == sum(n for n, sk in zip(lens, skip) if not sk)
    assert got["members"] == t.num_rows


def test_bench_data_command_prints_ratios():
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_data.py", "--rows", "4000", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| plain pq.read_table | " in out.stdout and "x plain Parquet read" in out.stdout


def test_awkward_inputs_fail_loudly_or_work():
    r = Ragged.from_lists([[1, 2, 3], [4]], dtype=np.int64)
    with pytest.raises(ValueError, match="does not fit width 2"):
        gather_pad([r], [0, 1], 0, np.int64, width=2)
    assert r[-1].tolist() == [4]
    with pytest.raises(IndexError):
        r[2]
    empty = Ragged.from_arrow(pa.chunked_array([], pa.list_(pa.int32())))
    assert len(empty) == 0 and empty.values.dtype == np.int32


def test_a_null_inside_a_list_column_is_named(tmp_path):
    import schemas

    col = schemas.UNITS.column("old_logprobs")
    table = pa.table({"old_logprobs": pa.array([[-1.0], [-0.5, None]], col.type)})
    one = schemas.Schema("one", (col,), "test")
    with pytest.raises(schemas.SchemaError, match=r"f.parquet, column 'old_logprobs', row 1"):
        schemas.validate(table, one, tmp_path / "f.parquet")
