"""The prompt dataset: the built-in demo task or a user dataset, materialised once as Parquet.

`materialize` turns `data.prompts` into `CACHE/prompts/<key>/prompts.parquet` (schema
`prompts`), keyed like a stage by the source's content digest and the `data.*` settings
that shape the table, so generate reads one format and a changed source changes every key
after it. Sources:

- `demo`: the built-in reverse-the-digits task;
- a `.parquet`, `.jsonl` or `.json` (records) file, or a folder holding only Parquet files
  (one table);
- a `datasets` folder: one written by `save_to_disk`, or a dataset repository's files
  (`train.jsonl`, `data/test-00000-of-00001.parquet`, ...), read by `datasets` with
  `data.split` and `data.subset`;
- a `datasets` id (`openai/gsm8k`), loaded with `datasets.load_dataset(id, data.subset,
  split=data.split)`: from the local Hugging Face cache when `HF_HUB_OFFLINE=1` (an
  uncached id is then an error saying so), else downloaded there first.

The prompt column (`data.prompt_column`) holds text or a conversation: a list of
`{"role", "content"}` messages, TRL's conversational format, which generate renders with
the tokenizer's chat template. `data.system_prompt` puts a system message first in every
conversation that has none (a text prompt then becomes the conversation `[system, user]`).
`data.answer_column` is renamed `answer`, the column the built-in rewards read.

A missing `prompt_id` column is filled from the row number; any other missing or
malformed column is an error naming the file and the column (for messages: the row). A
file that cannot be read (not UTF-8, a line that is not JSON, no records, a column whose
rows mix types) is an error naming the file and the 1-based line.

`load_table(cfg)` builds the same table in memory without writing anything: the
command line's preflight checks (flows/preflight.py) read the prompt file's columns and
first rows through it before any stage starts, and `materialize` then reuses the table.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

import schemas
from pipeline import cache
from pipeline.config import Config
from pipeline.stage import code_digest

VERSION = 1
_RECORD = 'one JSON object per line, e.g. {"prompt": "...", "answer": "..."}'


def _fail(msg: str):
    raise schemas.SchemaError(msg)


def _table_digest(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def _text(p: Path, data: bytes) -> str:
    """The file's text; non-UTF-8 bytes are an error naming the line and column."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        start = e.start
        line = data.count(b"\n", 0, start) + 1
        col = start - (data.rfind(b"\n", 0, start) + 1) + 1
        _fail(
            f"file {p}, line {line}: not UTF-8 text (byte 0x{data[start]:02x} at column "
            f"{col}). Save the file as UTF-8."
        )


def _table(p: Path, records: list[dict], lines: list[int] | None) -> pa.Table:
    """Records -> table; a column whose rows hold different types is an error naming it."""
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    where = (lambda i: f"line {lines[i]}") if lines else (lambda i: f"record {i + 1}")
    names = list(dict.fromkeys(k for r in records for k in r))
    for name in names:
        values = [r.get(name) for r in records]
        try:
            pa.array(values)
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass
        first = next(i for i, v in enumerate(values) if v is not None)
        kind = _kind(values[first])
        other = next((i for i, v in enumerate(values) if v is not None and _kind(v) != kind), None)
        if other is None:
            _fail(
                f"file {p}, column '{name}': its values cannot be stored as one column "
                f"(first at {where(first)}). Give every row the same type."
            )
        _fail(
            f"file {p}, column '{name}': {where(first)} holds {kind}, {where(other)} holds "
            f"{_kind(values[other])}. Give every row the same type (e.g. quote numbers as "
            "strings)."
        )
    _fail(
        f"file {p}: the records cannot be stored as a table. Give every row the same "
        "columns and types."
    )


def _kind(v) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def read_jsonl(p: Path) -> pa.Table:
    data = p.read_bytes()
    text = _text(p, data)
    if not text.strip():
        _fail(f"file {p} is empty: it holds no records. Write {_RECORD}.")
    try:  # fast path; its errors name no line, so the slow path below finds the line
        return pj.read_json(io.BytesIO(text.encode()))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    records, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(
                f"file {p}, line {n}: not valid JSON ({e.msg} at column {e.colno}). "
                f"Write {_RECORD}."
            )
        if not isinstance(rec, dict):
            _fail(f"file {p}, line {n}: expected a JSON object, got {_kind(rec)}. Write {_RECORD}.")
        records.append(rec)
        lines.append(n)
    return _table(p, records, lines)


def read_json(p: Path) -> pa.Table:
    text = _text(p, p.read_bytes())
    if not text.strip():
        _fail(f"file {p} is empty: it holds no records. Write a JSON list of objects.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        _fail(f"file {p}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}).")
    if not isinstance(data, list):
        _fail(
            f"file {p}: expected a JSON list of records, got {_kind(data)}. For one record "
            "per line use a .jsonl file."
        )
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            _fail(f"file {p}, record {i + 1}: expected a JSON object, got {_kind(rec)}.")
    return _table(p, data, None)


FILE_SUFFIXES = (".parquet", ".jsonl", ".json")


def is_dataset_id(source: str) -> bool:
    """`name` or `org/name`, no such path here: a `datasets` id (hub or local cache)."""
    p = Path(source).expanduser()
    return (
        not p.exists()
        and p.suffix not in FILE_SUFFIXES
        and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None
    )


def is_datasets_folder(p: Path) -> bool:
    """A folder `datasets` reads: not the flat folder of Parquet files read as one table."""
    if not p.is_dir():
        return False
    entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    return not entries or not all(e.is_file() and e.suffix == ".parquet" for e in entries)


def read_dataset(source: str, split: str, subset: str) -> pa.Table:
    """A `datasets` folder or id as one Arrow table (`data.split` of `data.subset`)."""
    import datasets

    where = f"data.prompts={source}"
    p = Path(source).expanduser()
    try:
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset(str(p) if p.exists() else source, subset or None)
    except (ValueError, OSError) as e:  # not found, unknown subset, offline, bad files
        if not p.exists() and datasets.config.HF_HUB_OFFLINE:
            _fail(
                f"{where}: no such file or folder, and with HF_HUB_OFFLINE=1 the dataset "
                f"{source!r} is not in the local Hugging Face cache ({type(e).__name__}: {e}). "
                "Load it once where there is network access, or give a local file or folder."
            )
        _fail(
            f"{where}: `datasets` could not load it ({type(e).__name__}: {e}). Give `demo`, "
            "a file, a dataset folder or a dataset id (with data.subset if it has several)."
        )
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            _fail(
                f"{where}: no split {split!r} (data.split); splits: {', '.join(ds)}. "
                "Set data.split to one of them."
            )
        ds = ds[split]
    return ds.with_format("arrow")[:]


def read_source(source: str, split: str = "train", subset: str = "") -> pa.Table:
    p = Path(source).expanduser()
    if is_dataset_id(source) or is_datasets_folder(p):
        table = read_dataset(source, split, subset)
        if table.num_rows == 0:
            _fail(f"data.prompts: {source} (split {split!r}) holds no records.")
        return table
    if not p.exists():
        _fail(
            f"data.prompts: {source} does not exist; give `demo`, a .parquet/.jsonl/.json "
            "file, a folder of Parquet files, a `datasets` folder or a `datasets` id"
        )
    if not (p.is_dir() or p.suffix in FILE_SUFFIXES):
        _fail(f"data.prompts: {p} has unknown format {p.suffix!r}; use .parquet, .jsonl or .json")
    try:
        if p.is_dir() or p.suffix == ".parquet":
            try:
                table = pq.read_table(p)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
                if isinstance(e, PermissionError):
                    raise
                _fail(
                    f"data.prompts: {p} is not readable as Parquet ({e}). Give a Parquet "
                    "file, or a folder holding only Parquet files."
                )
        else:
            table = read_json(p) if p.suffix == ".json" else read_jsonl(p)
    except PermissionError as e:
        _fail(
            f"data.prompts: {e.filename or p} cannot be read (permission denied). Make it "
            "readable for this user."
        )
    except IsADirectoryError:
        _fail(f"data.prompts: {p} is a folder; only Parquet files may be given as a folder.")
    if table.num_rows == 0:
        _fail(f"data.prompts: {p} holds no records. Give a file with at least one prompt.")
    return table


def source_digest(cfg: Config):
    d = cfg.data
    if d.prompts == "demo":
        return {"demo": d.demo_size, "seed": cfg.seed}
    if d.prompts == "pad":  # the second built-in task (pipeline/pad_task.py)
        return {"pad": d.demo_size, "seed": cfg.seed}
    if is_dataset_id(d.prompts):
        # The hub's files are not at hand before loading: key by the content of the table
        # `datasets` serves (its cache makes a second load cheap).
        table = read_source(d.prompts, d.split, d.subset)
        return {
            "dataset": d.prompts,
            "split": d.split,
            "subset": d.subset,
            "content": _table_digest(table),
        }
    p = Path(d.prompts).expanduser()
    try:
        digest = cache.folder_digest(p) if p.is_dir() else cache.source_digest(p)
        if is_datasets_folder(p):
            return {"folder": digest, "split": d.split, "subset": d.subset}
        return digest
    except FileNotFoundError:
        read_source(d.prompts)  # raises naming the file
        raise
    except PermissionError as e:
        _fail(
            f"data.prompts: {e.filename or p} cannot be read (permission denied). Make it "
            "readable for this user."
        )


# (source digest, prompt column, id column) -> table: the preflight check and materialize
# in one process read the file once.
_memo: dict[tuple, pa.Table] = {}


def load_table(cfg: Config, digest=None) -> pa.Table:
    """The prompts table `materialize` writes: columns renamed, ids filled, validated."""
    d = cfg.data
    digest = source_digest(cfg) if digest is None else digest
    memo_key = (json.dumps(digest, sort_keys=True, default=str), *shaping(cfg).values())
    if memo_key in _memo:
        return _memo[memo_key]
    if d.prompts == "demo":
        from pipeline.demo import make_demo_prompts

        table = make_demo_prompts(d.demo_size, seed=cfg.seed)
    elif d.prompts == "pad":
        from pipeline.pad_task import make_pad_prompts

        table = make_pad_prompts(d.demo_size, seed=cfg.seed)
    else:
        table = read_source(d.prompts, d.split, d.subset)
    where = {"demo": "the demo", "pad": "the pad task"}.get(d.prompts, d.prompts)
    if d.prompt_column not in table.column_names:
        _fail(
            f"file {where}: no column '{d.prompt_column}' (data.prompt_column); columns: "
            f"{', '.join(table.column_names)}. Set data.prompt_column to the prompt's column."
        )
    if d.prompt_column != "prompt":
        if "prompt" in table.column_names:
            table = table.drop_columns(["prompt"])
        table = table.rename_columns(
            ["prompt" if c == d.prompt_column else c for c in table.column_names]
        )
    if d.id_column in table.column_names:
        ids = table.column(d.id_column).cast(pa.string())
        table = table.drop_columns([d.id_column])
    else:
        ids = pa.array([f"p{i:06d}" for i in range(table.num_rows)])
    table = table.drop_columns([c for c in ("prompt_id",) if c in table.column_names])
    table = table.add_column(0, "prompt_id", ids)
    if d.answer_column != "answer" and d.answer_column in table.column_names:
        table = table.drop_columns([c for c in ("answer",) if c in table.column_names])
        table = table.rename_columns(
            ["answer" if c == d.answer_column else c for c in table.column_names]
        )
    elif d.answer_column != "answer":
        _fail(
            f"file {where}: no column '{d.answer_column}' (data.answer_column); columns: "
            f"{', '.join(table.column_names)}. Set data.answer_column to the answer's column."
        )
    table = conversations(table, where, d.system_prompt)
    table = schemas.validate(table, schemas.PROMPTS, where)
    if len(set(table.column("prompt_id").to_pylist())) != table.num_rows:
        _fail(f"file {where}, column '{d.id_column}': ids are not unique")
    _memo.clear()
    _memo[memo_key] = table
    return table


def shaping(cfg: Config) -> dict:
    """The data.* settings that shape the prompts table (beside the source's content)."""
    d = cfg.data
    return {
        "prompt_column": d.prompt_column,
        "id_column": d.id_column,
        "answer_column": d.answer_column,
        "system_prompt": d.system_prompt,
    }


def conversations(table: pa.Table, where: str, system_prompt: str) -> pa.Table:
    """The prompt column as text, or as messages of exactly {role, content} strings (what
    `datasets` or JSON give may order or type the fields otherwise); a system message
    first where `system_prompt` asks for one."""
    col = table.column("prompt")
    chat = schemas.is_chat(col.type)
    if not chat and not system_prompt:
        return table
    rows = col.to_pylist()
    out = []
    for i, conv in enumerate(rows):
        if not chat:
            conv = [{"role": "user", "content": conv}]
        if not isinstance(conv, list) or not conv:
            _fail(
                f"file {where}, column 'prompt', row {i}: an empty conversation. Give at "
                "least one message."
            )
        msgs = []
        for m in conv:
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                _fail(
                    f"file {where}, column 'prompt', row {i}: message {m!r} is not "
                    '{"role": "...", "content": "..."} with text in both. Write TRL\'s '
                    "conversational format."
                )
            msgs.append({"role": m["role"], "content": m["content"]})
        if system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        out.append(msgs)
    i = table.column_names.index("prompt")
    return table.set_column(i, "prompt", pa.array(out, schemas.CHAT))


def materialize(cfg: Config, root: Path) -> Path:
    d = cfg.data
    digest = source_digest(cfg)
    key = cache.cache_key(
        {
            "stage": "prompts",
            "version": VERSION,
            "source": digest,
            **shaping(cfg),
            "code": code_digest("pipeline.prompts"),
        }
    )
    folder = root / "prompts" / key
    if cache.lookup(folder) is not None:
        _memo.clear()
        return folder

    def produce(tmp: Path) -> dict:
        table = load_table(cfg, digest)
        pq.write_table(table, tmp / "prompts.parquet")
        return {"rows": table.num_rows, "metrics": {}}

    cache.write(folder, produce, {"stage": "prompts", "key": key, "source": d.prompts})
    _memo.clear()  # written: the table need not stay in memory for the rest of the run
    return folder
