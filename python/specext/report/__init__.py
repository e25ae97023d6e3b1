"""``report.html`` and its figures for a run directory: :mod:`.plots` draws, :mod:`.html`
writes the page. May import ``pipelines.rundir`` (its atomic writers) and nothing else of
the package."""

from specext.report.html import write_report  # noqa: F401
