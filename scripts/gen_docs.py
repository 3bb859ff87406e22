"""Regenerate the generated parts of the docs: docs/schemas.md and docs/config.md.

.venv/bin/python scripts/gen_docs.py          # write
.venv/bin/python scripts/gen_docs.py --check  # exit 1 if they are stale (tests run this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import schemas
from flows.runner import load_stages
from pipeline.config import describe

ROOT = Path(__file__).resolve().parents[1]
load_stages()  # the registries name the valid values of engine, strategy, ...


def config_md() -> str:
    rows = [
        "# Config keys",
        "",
        "Generated from `pipeline/config.py` by `scripts/gen_docs.py`; `eqlen config` prints "
        "the same. Set them in a YAML file (`--config`, nested by section) or with "
        "`--set section.key=value`.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, tp, default, help_ in describe():
        rows.append(f"| `{key}` | {tp} | `{default}` | {help_} |")
    return "\n".join(rows) + "\n"


def schemas_md() -> str:
    return (
        "# Dataset schemas\n\nGenerated from `schemas/__init__.py` by `scripts/gen_docs.py`."
        "\n\n" + schemas.describe_markdown()
    )


def main() -> int:
    check = "--check" in sys.argv
    stale = []
    for name, text in (("docs/config.md", config_md()), ("docs/schemas.md", schemas_md())):
        path = ROOT / name
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run .venv/bin/python scripts/gen_docs.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
