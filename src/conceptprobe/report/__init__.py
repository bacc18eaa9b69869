"""The comparison report: ``conceptprobe report PATH ... --out report.html``.

:func:`build_report` collects complete run folders under the paths (:mod:`.collect`), recomputes the
comparison table and CD-vs-accuracy fits from ``metrics.parquet`` (:mod:`.stats`), draws the figures
(:mod:`.figures`, UMAPs in :mod:`.embedding`) and writes one self-contained HTML file plus a Markdown
summary and PNG figures beside it (:mod:`.render`). ICL-score, induction-heads, token-loss-PCA, patching and
finetuning result folders under the paths add their own sections (:mod:`.extras` finds and reads them,
:mod:`.extra_figures` draws, :mod:`.extra_sections` lays them out).
"""

from conceptprobe.report.collect import ReportData, ReportError, RunInfo, collect, find_run_folders

__all__ = ["ReportData", "ReportError", "RunInfo", "build_report", "collect", "find_run_folders"]


def build_report(*args, **kwargs):  # noqa: ANN002, ANN003 - forwards to render.build_report
    """See :func:`conceptprobe.report.render.build_report` (imported lazily: it pulls in matplotlib)."""
    from conceptprobe.report.render import build_report as _build

    return _build(*args, **kwargs)
