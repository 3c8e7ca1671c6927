"""``report.md`` + ``results.json`` of a demo or reproduce run directory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.report.results import ModelRow, markdown_table

__all__ = ["write_report"]


def write_report(
    out_dir: str | Path,
    title: str,
    rows: Sequence[ModelRow],
    *,
    intro: str = "",
    plots: Sequence[Path] = (),
    facts: dict[str, Any] | None = None,
    paper: bool = False,
    extra: str = "",
) -> tuple[Path, Path]:
    """Write ``report.md`` (table, definitions, plots, notes) and ``results.json`` (every number)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = dict(facts or {})
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += [markdown_table(list(rows), paper=paper), ""]
    notes = [(r.name, r.packed_note) for r in rows if r.packed_note and r.method != "fp"]
    if notes:
        lines += ["Notes:", ""] + [f"- **{n}**: {t}" for n, t in notes] + [""]
    lines += [
        "Columns: *test err sim* = the trained model as it trains (fake quantization in float); "
        "*test err packed* = the packed model (`lowbit.pack`) after a round trip through its "
        "`.lowbit` file, on the same test set; *agree* = share of test samples where both predict "
        "the same class; *file* = size of the `.lowbit` file; *compr.* = float32 bytes of the same "
        "architecture / file size; *q-layer compr.* = float32 bytes of the quantized layers' "
        "weights and biases / bytes of their packed tensors; *samples/s b256* and *latency b1* = "
        "packed model, medians, against the float32 PyTorch model of the same architecture "
        "(*vs fp32*), same process, same threads: each row's float model is timed alternately "
        "with it, call by call, so the ratio is not the quotient of this row and the float row "
        "(a separate measurement on a shared machine).",
        "",
    ]
    if paper:
        lines += [
            "*paper* = the number the recipe reproduces ([paper] table); *protocol err* = the "
            "test error at the epoch with the best validation error (the papers' protocol); the "
            "sim/packed columns are the final weights.",
            "",
        ]
    if extra:
        lines += [extra, ""]
    for p in plots:
        rel = Path(p).relative_to(out) if Path(p).is_relative_to(out) else Path(p)
        lines += [f"![{rel.stem}]({rel.as_posix()})", ""]
    if facts:
        lines += ["## Run", ""] + [f"- {k}: {v}" for k, v in facts.items()] + [""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    js = out / "results.json"
    js.write_text(
        json.dumps(
            {"title": title, "rows": [r.to_dict() for r in rows], "facts": facts},
            indent=2,
            default=str,
        )
        + "\n"
    )
    return md, js
