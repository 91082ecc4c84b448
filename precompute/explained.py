"""Which model output the fidelity statistics explain: one policy for the run, the report and the
dashboard.

`choose_output` resolves what a user asked for (a name or an index); `default_output` is the one
default when nothing was asked: 'TUM' when the model has it (the demo model's tumour class), else the
only output, or the second of two (the positive class); no default for other models (the run then says
to pass --explain). numpy only: the dashboard imports it.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import numpy as np

DEFAULT_OUTPUT = "TUM"  # the demo model's tumour class
DEFAULT_TEXT = (f"{DEFAULT_OUTPUT} (the tumour class) when the model has it, else the model's only output, "
                "or the second of two (the positive class)")


def default_output(output_names: Sequence[str]) -> tuple[int | None, str]:
    """The output explained when none was asked for: (index, name), or (None, "") when the model has
    more than two outputs and none is named DEFAULT_OUTPUT."""
    names = [str(n) for n in output_names]
    if DEFAULT_OUTPUT in names:
        return names.index(DEFAULT_OUTPUT), DEFAULT_OUTPUT
    if 1 <= len(names) <= 2:
        return len(names) - 1, names[-1]
    return None, ""


def resolve_output(wanted: str | int | None, names: Sequence[str], n_outputs: int) -> tuple[int | None, str]:
    """The run's explained output: what the user asked for (checked by `choose_output`), else
    `default_output`. names: the model's class names (replaced by out_0.. when they do not match
    n_outputs). Returns (None, "") when there is no default (the run then asks for --explain)."""
    names = list(names) if names and len(names) == n_outputs else [f"out_{i}" for i in range(n_outputs)]
    if wanted is not None:
        return choose_output(names, True, wanted)
    return default_output(names)


def choose_output(output_names: Sequence[str], probs_available: bool, wanted: str | int | None) -> tuple[int, str]:
    """Resolve which model output to explain. Returns (index, name).

    wanted: an index (int or a string of digits), a name matched case-insensitively (e.g. "TUM"), or
    None, which picks the only output of a single-output model and is an error otherwise (the
    message lists the names). probs_available: whether the atlas stores probabilities; it only
    changes the wording of the error (the positive threshold applies to them).
    """
    names = [str(n) for n in output_names]
    if not names:
        raise ValueError("the model has no outputs to explain (the atlas stores no output columns).")
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(names))
    if wanted is None:
        if len(names) == 1:
            return 0, names[0]
        role = " (its logit is regressed, its probability decides which tiles count as positive)" \
            if probs_available else " (its logit is regressed)"
        raise ValueError(f"the model has {len(names)} outputs; choose the one to explain{role} by name or "
                         f"index: {listing}.")
    if isinstance(wanted, (bool, np.bool_)):
        raise ValueError(f"output must be a name or an index, got {wanted!r}. Outputs: {listing}.")
    if isinstance(wanted, str) and wanted.strip().isdigit():
        wanted = int(wanted.strip())
    if isinstance(wanted, (int, np.integer)):
        if not 0 <= int(wanted) < len(names):
            raise ValueError(f"output index {wanted} is out of range: the model has {len(names)} outputs "
                             f"(0-{len(names) - 1}): {listing}.")
        return int(wanted), names[int(wanted)]
    key = str(wanted).strip().casefold()
    hits = [i for i, n in enumerate(names) if n.casefold() == key]
    if hits:
        return hits[0], names[hits[0]]
    folded = {n.casefold(): n for n in names}
    close = [folded[c] for c in difflib.get_close_matches(key, list(folded), n=3, cutoff=0.5)]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"no model output named {wanted!r}.{hint} Outputs: {listing}.")
