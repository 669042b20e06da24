"""Merge the per-sub-MS return values of a CASA task into one, as casatasks does.

casatasks 6.7.0.31 merges them in ``ParallelTaskHelper.consolidateResults``
(``casatasks/private/parallel/parallel_task_helper.py``):

* if the FIRST value is a bool: AND of all values (a WARN "<task> failed for
  sub-MS <name>" per false one);
* else, if any value is a dict: every dict is folded with ``combine_dictionaries``
  (numbers summed, strings and ``nreport`` kept from the first, nested dicts
  recursively, rflag reports through ``combine_rflag_subreport``), non-dicts
  skipped, then ``finalize_consolidate_results`` (median of the per-sub-MS rflag
  thresholds, sorted by spw/field);
* else ``None``, silently, whatever the values were; and an empty input raises
  ``IndexError``.

:func:`merge_results` calls those static methods and decides beforehand what they
cannot: no values, only ``None`` values, and values of other types.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

__all__ = ["merge_results"]


def _is_bool(value: object) -> bool:
    # numpy.bool_ is not a bool; casatasks would then take the dict branch and
    # return None, so accept it (CASA tools return numpy scalars in places).
    return isinstance(value, bool) or type(value).__name__ in ("bool_", "bool")


def merge_results(per_submms: Mapping[str, object], taskname: str) -> object:
    """One result for a task run once per sub-MS; ``per_submms`` maps sub-MS path to return.

    * ``{}`` (nothing ran) or only ``None`` values (tasks that return nothing): ``None``;
    * only booleans: their AND, as casatasks (``consolidateResults``, which also logs
      a WARN for each sub-MS whose value is false);
    * dicts, possibly with some ``None`` (e.g. flagdata reports): combined as casatasks
      does (``combine_dictionaries`` + ``finalize_consolidate_results``);
    * anything else (other types, or bools mixed with other values, where casatasks'
      answer would depend on which sub-MS comes first): a new dict with the same
      items, keyed by sub-MS, values untouched.

    The caller's dicts are never modified: casatasks' helpers add into, and keep
    references to, the dicts and numpy arrays they are given, so they get deep copies.
    ``consolidateResults`` posts a WARN line with the whole dict for every sub-MS it
    merges (debug output left in casatasks); dicts are merged with the two helpers it
    calls instead, so those lines do not reach the log, nor the notebook.  A failure
    while merging dicts raises, as in casatasks.
    """
    values = list(per_submms.values())
    if all(value is None for value in values):  # also true for no values at all
        return None

    # Lazy: importing casatasks loads casatools (and reads CASA's configuration).
    from casa_kernel.casa.private import parallel_task_helper

    helper = parallel_task_helper()  # casatasks' ParallelTaskHelper

    if all(_is_bool(value) for value in values):
        as_bools = {name: bool(value) for name, value in per_submms.items()}
        return helper.consolidateResults(as_bools, taskname)

    if all(value is None or isinstance(value, dict) for value in values):
        merged: dict = {}
        for value in values:
            if value is not None:
                merged = helper.combine_dictionaries(copy.deepcopy(value), merged)
        return helper.finalize_consolidate_results(merged)

    return dict(per_submms)
