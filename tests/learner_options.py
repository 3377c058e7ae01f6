"""Test helper: learner constructor keywords with the inner-loop options gathered into one ``InnerOptions``.

Test helpers take the inner loop's options as flat keywords (``inner_steps=2, first_order=True``) so that each
test states only what it varies; :func:`with_inner` turns them into the constructor's ``inner=InnerOptions(...)``.
"""

from __future__ import annotations

from typing import Any

from metaloop.algorithms import InnerOptions

# the flat keyword a test helper takes -> the InnerOptions field
FIELDS = {
    "inner_steps": "steps", "eval_inner_steps": "eval_steps", "first_order": "first_order", "adapt_params": "params",
    "batch_tasks": "batch_tasks", "meta_grad": "meta_grad", "truncate": "truncate", "implicit": "implicit",
    "inner_lr": "lr",
}


def with_inner(options: dict[str, Any]) -> dict[str, Any]:
    """Returns ``options`` with its inner-loop keywords replaced by ``inner=InnerOptions(...)`` (kept if given)."""
    rest = {k: v for k, v in options.items() if k not in FIELDS}
    if "inner" not in rest:
        rest["inner"] = InnerOptions(**{FIELDS[k]: v for k, v in options.items() if k in FIELDS})
    return rest
