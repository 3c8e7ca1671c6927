"""Reports of lowbit runs: the results table (accuracy simulated and packed, size, compression,
speed against float PyTorch), Markdown reports and PNG figures.

* :mod:`lowbit.report.results` — :class:`ModelRow`, :func:`measure`, the tables;
* :mod:`lowbit.report.plots` — training curves, weight histograms, size/accuracy/speed trade-off;
* :mod:`lowbit.report.markdown` — ``report.md`` and ``results.json``;
* :mod:`lowbit.report.ttq_plots` — the TTQ paper's figures (scales, sparsity, histograms).
"""

from __future__ import annotations

from lowbit.report.markdown import write_report
from lowbit.report.results import ModelRow, format_table, markdown_table, measure

__all__ = ["ModelRow", "format_table", "markdown_table", "measure", "write_report"]
