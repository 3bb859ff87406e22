"""Progress bars for long stages: tqdm with rate and ETA, on a terminal only.

`bar(total, desc, unit, ctx)` is silent when stdout is not a terminal (`disable=None`: logs
and CI stay clean) and when the stage runs nested inside another that shows its own bar
(the eval runs generate per chunk of prompts: `ctx.progress` is False there).
"""

from __future__ import annotations


def bar(total: int, desc: str, unit: str, ctx=None):
    from tqdm.auto import tqdm

    shown = getattr(ctx, "progress", True)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=None if shown else True,
        dynamic_ncols=True,
        leave=False,
    )
