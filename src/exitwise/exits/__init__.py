"""Exit criteria: who decides, at an exit-capable layer, that a token is done.

Each criterion is one file implementing :class:`~exitwise.exits.base.ExitCriterion`; a new one is one
more file plus a line in :data:`~exitwise.exits.base.CRITERIA`.
"""

from exitwise.exits.base import CRITERIA, ExitCriterion, Readout, make_criterion

__all__ = ["CRITERIA", "ExitCriterion", "Readout", "make_criterion"]
