"""Benchmarks: speed and bytes, always as ratios against a baseline measured in the same run.

Every module here but ``netns`` (the shaped links the network benchmarks
use) registers a study of kind ``"bench"`` (see
:mod:`gradcomp_studies.reproduce.common`): ``gradcomp bench NAME`` runs it and
writes ``results/bench-NAME.md`` with the command, machine and date.
"""

from ..reproduce.common import discover

discover(__name__, __path__, "bench")
