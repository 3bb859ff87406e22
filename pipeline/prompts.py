"""The prompt dataset: the built-in demo task or a user file, materialised once as Parquet.

`materialize` turns `data.prompts` into `CACHE/prompts/<key>/prompts.parquet` (schema
`prompts`), keyed like a stage by the source's content digest, so generate reads one
format and a changed source file changes every key after it. Sources: `demo`, a `.parquet`
file or folder of them, `.jsonl` or `.json` (records). A missing `prompt_id` column is
filled from the row number; any other missing or malformed column is an error naming the
file and the column.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

import schemas
from pipeline import cache
from pipeline.config import Config

VERSION = 1


def read_source(source: str) -> pa.Table:
    p = Path(source).expanduser()
    if not p.exists():
        raise schemas.SchemaError(f"data.prompts: {source} does not exist; give `demo` or a "
                                  ".parquet/.jsonl/.json file or folder of Parquet files")
    if p.is_dir() or p.suffix == ".parquet":
        return pq.read_table(p)
    if p.suffix in (".jsonl", ".json"):
        if p.suffix == ".json":
            import json
            data = json.loads(p.read_text())
            if not isinstance(data, list):
                raise schemas.SchemaError(f"file {p}: expected a JSON list of records")
            return pa.Table.from_pylist(data)
        return pj.read_json(p)
    raise schemas.SchemaError(f"data.prompts: {p} has unknown format {p.suffix!r}; use .parquet, "
                              ".jsonl or .json")


def materialize(cfg: Config, root: Path) -> Path:
    d = cfg.data
    if d.prompts == "demo":
        source_digest = {"demo": d.demo_size, "seed": cfg.seed}
    else:
        source_digest = cache.folder_digest(d.prompts) if Path(d.prompts).is_dir() else \
            cache.source_digest(d.prompts)
    key = cache.cache_key({"stage": "prompts", "version": VERSION, "source": source_digest,
                           "prompt_column": d.prompt_column, "id_column": d.id_column,
                           "code": cache.source_digest(__file__)})
    folder = root / "prompts" / key
    if cache.lookup(folder) is not None:
        return folder

    def produce(tmp: Path) -> dict:
        if d.prompts == "demo":
            from pipeline.demo import make_demo_prompts
            table = make_demo_prompts(d.demo_size, seed=cfg.seed)
        else:
            table = read_source(d.prompts)
        where = "the demo" if d.prompts == "demo" else d.prompts
        if d.prompt_column not in table.column_names:
            raise schemas.SchemaError(
                f"file {where}: no column '{d.prompt_column}' (data.prompt_column); columns: "
                f"{', '.join(table.column_names)}. Set data.prompt_column to the prompt's column.")
        if d.prompt_column != "prompt":
            if "prompt" in table.column_names:
                table = table.drop_columns(["prompt"])
            table = table.rename_columns(["prompt" if c == d.prompt_column else c
                                          for c in table.column_names])
        if d.id_column in table.column_names:
            ids = table.column(d.id_column).cast(pa.string())
            table = table.drop_columns([d.id_column])
        else:
            ids = pa.array([f"p{i:06d}" for i in range(table.num_rows)])
        table = table.drop_columns([c for c in ("prompt_id",) if c in table.column_names])
        table = table.add_column(0, "prompt_id", ids)
        table = schemas.validate(table, schemas.PROMPTS, where)
        if len(set(table.column("prompt_id").to_pylist())) != table.num_rows:
            raise schemas.SchemaError(f"file {where}, column '{d.id_column}': ids are not unique")
        pq.write_table(table, tmp / "prompts.parquet")
        return {"rows": table.num_rows, "metrics": {}}

    cache.write(folder, produce, {"stage": "prompts", "key": key, "source": d.prompts})
    return folder
