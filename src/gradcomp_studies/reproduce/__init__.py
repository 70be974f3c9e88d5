"""``gradcomp reproduce TABLE``: run a study end to end and put our figures beside the published ones.

Every module in this package (other than ``common`` and private ``_*``
modules) is a study: importing it calls :func:`register` with a
:class:`Study`.  Adding a table is adding a module::

    # src/gradcomp_studies/reproduce/lm.py
    from .common import Context, Result, Study, register

    def run(ctx: Context) -> Result:
        ...   # ctx.full chooses the variant; write plots to ctx.path(".png")

    register(Study("lm", "PTB language model: dense vs DGC, perplexity and ratio", run, order=3))

A module that fails to import is left out of the listing (with a logged
warning) and its error is raised again when its table is asked for, so one
broken study never breaks the ``gradcomp`` command.

>>> from gradcomp_studies.reproduce import run_study
>>> outcome = run_study("ratio", full=False, out_dir="results")   # writes results/ratio-quick.md
>>> outcome.passed, outcome.report
"""

from __future__ import annotations

from .common import (
    Check,
    Context,
    Outcome,
    Result,
    Study,
    StudySkipped,
    UnknownStudyError,
    discover,
    get_study,
    register,
    report_name,
    run_study,
    studies,
)

__all__ = [
    "Check",
    "Context",
    "Outcome",
    "Result",
    "Study",
    "StudySkipped",
    "UnknownStudyError",
    "get_study",
    "register",
    "report_name",
    "run_study",
    "studies",
]

discover(__name__, __path__, "reproduce")
