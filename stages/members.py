"""The update's members, column by column, as Arrow lays them out.

A units dataset of a million members holds tens of millions of tokens. Turning every
list column into Python lists (one object per token) costs many times the Parquet read,
so the update keeps each column as numpy: a scalar column is one array, a list column a
`Ragged` (one flat array of values plus row offsets, Arrow's own list layout, shared
without copying). A micro-batch gathers its rows into padded tensors in a few vectorised
numpy steps; nothing ever loops over members in Python. `benchmarks/bench_data.py`
measures it against a plain Parquet read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.lazy import lazy_import

torch = lazy_import("torch")


class Ragged:
    """Rows of varying length: row i is `values[offsets[i]:offsets[i + 1]]`."""

    __slots__ = ("values", "offsets")

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values, self.offsets = values, np.asarray(offsets, dtype=np.int64)

    @classmethod
    def from_arrow(cls, arr: pa.ChunkedArray | pa.Array) -> Ragged:
        # Chunk by chunk with int64 offsets: combine_chunks would overflow a list column's
        # int32 offsets past 2^31 values (a million members of 2k-token contexts).
        chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
        offsets, values, base = [], [], 0
        for c in chunks:
            # A sliced array's offsets do not start at 0; flatten() honours the slice.
            o = c.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
            offsets.append(o[:-1] - o[0] + base)
            base += int(o[-1] - o[0])
            values.append(c.flatten().to_numpy(zero_copy_only=False))
        if not values:
            values = [np.zeros(0, dtype=arr.type.value_type.to_pandas_dtype())]
        flat = values[0] if len(values) == 1 else np.concatenate(values)
        return cls(flat, np.concatenate([*offsets, [base]]))

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence], dtype=None) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = [v for r in rows for v in r]
        return cls(np.asarray(flat, dtype=dtype), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        i = range(len(self))[i]  # negative indices count from the end; out of range raises
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def lengths_of(self, rows) -> list[int]:
        rows = np.asarray(rows, dtype=np.int64)
        return (self.offsets[rows + 1] - self.offsets[rows]).tolist()

    def row_of_value(self) -> np.ndarray:
        """For each value, the row it belongs to."""
        return np.repeat(np.arange(len(self)), self.lengths)

    def take(self, rows) -> Ragged:
        rows = np.asarray(rows, dtype=np.int64)
        # (Not self.lengths: that is a pass over every row, and this runs per micro-batch.)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        # Value k of the result is value (k - offsets[r]) of source row r.
        src = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, lengths)
        return Ragged(self.values[src], offsets)

    def where_rows(self, rows: np.ndarray, value) -> Ragged:
        """A copy with every value of the rows where `rows` is True set to `value`."""
        values = self.values.copy()
        values[np.asarray(rows, dtype=bool)[self.row_of_value()]] = value
        return Ragged(values, self.offsets)

    def pad(self, value, dtype, width: int | None = None, rows=None) -> torch.Tensor:
        """[rows, width] tensor of `rows` (default: all), each row left-aligned and
        right-padded with `value`."""
        rows = np.arange(len(self)) if rows is None else rows
        out, _ = gather_pad([self], rows, value, numpy_dtype(dtype), width)
        return torch.from_numpy(out)

    def to_arrow(self) -> pa.Array:
        """A list array (a large_list one past 2^31 values)."""
        if self.offsets[-1] < 2**31:
            return pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), self.values)
        return pa.LargeListArray.from_arrays(pa.array(self.offsets, pa.int64()), self.values)

    def tolist(self) -> list[list]:
        return [self[i].tolist() for i in range(len(self))]


def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (torch.long -> int64)."""
    return torch.empty(0, dtype=dtype).numpy().dtype


def gather_pad(
    parts, rows, value, dtype, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """[len(rows), width] array whose row r is parts[0][rows[r]] ++ parts[1][rows[r]] ++ ...,
    right-padded with `value`, and each row's length. One gather and one scatter per part,
    straight from the source values: no intermediate `take` or concatenation, whose
    temporaries cost more than the Parquet read at a million members."""
    rows = np.asarray(rows, dtype=np.int64)
    lens = [p.offsets[rows + 1] - p.offsets[rows] for p in parts]
    total = np.sum(lens, axis=0) if lens else np.zeros(len(rows), np.int64)
    longest = int(total.max(initial=0))
    if width is None:
        width = longest
    elif longest > width:
        raise ValueError(f"gather_pad: a row of {longest} values does not fit width {width}")
    out = np.full((len(rows), width), value, dtype=dtype)
    flat = out.reshape(-1)
    at = np.arange(len(rows), dtype=np.int64) * width  # where each row's next part goes
    for p, n in zip(parts, lens):
        count = int(n.sum())
        k = np.arange(count, dtype=np.int64)
        first = np.cumsum(n) - n  # index in k of each row's first value
        # Value k belongs to row r: it comes from offsets[rows[r]] + (k - first[r]) and
        # lands at at[r] + (k - first[r]).
        flat[np.repeat(at - first, n) + k] = p.values[np.repeat(p.offsets[rows] - first, n) + k]
        at = at + n
    return out, total


def from_table(table: pa.Table, columns: Sequence[str]) -> dict:
    """`columns` of `table` as numpy: list columns `Ragged`, strings integer codes (they
    only group members; `strategy` and `finish_reason` are compared, so they stay text)."""
    out = {}
    for name in columns:
        col = table.column(name)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            out[name] = Ragged.from_arrow(col)
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            enc = pc.dictionary_encode(col).combine_chunks()
            if name in ("strategy", "finish_reason"):
                # Few distinct values: decode the dictionary, not a million strings.
                words = np.asarray(enc.dictionary.to_pylist(), dtype=object)
                out[name] = words[enc.indices.to_numpy(zero_copy_only=False)]
            else:
                out[name] = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            out[name] = col.to_numpy()
    return out


def as_columns(cols: Mapping) -> dict:
    """Columns given as Python lists (tests, callers of `minibatch_backward`) in the form
    `from_table` gives; columns already numpy stay as they are."""
    out = {}
    for name, v in cols.items():
        if isinstance(v, (Ragged, np.ndarray)):
            out[name] = v
        elif len(v) and isinstance(v[0], (list, tuple, np.ndarray)):
            out[name] = Ragged.from_lists(v)
        else:
            out[name] = np.asarray(v)
    return out
