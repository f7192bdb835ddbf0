"""Exit policies by name; see DESIGN.md for the table of rules.

The signal functions (``entropy``, ``normalized_entropy``) live in
:mod:`eeengine.policies.base`; the package attributes of those names are the policy modules.
"""

from __future__ import annotations

from eeengine.policies.base import ExitPolicy, run_policy
from eeengine.policies.entropy import EntropyPolicy
from eeengine.policies.none import NoExitPolicy
from eeengine.policies.normalized_entropy import NormalizedEntropyPolicy
from eeengine.policies.pcee import PceePolicy

POLICIES: dict[str, type[ExitPolicy]] = {
    cls.name: cls for cls in (EntropyPolicy, NormalizedEntropyPolicy, PceePolicy, NoExitPolicy)
}


def make_policy(name: str, **params) -> ExitPolicy:
    """Build a policy from its name and parameters (``threshold``, ``patience``).

    Parameters that are None are left at the policy's default.

    Raises:
        ValueError: unknown policy name, a parameter the policy does not take, or a bad value.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    params = {k: v for k, v in params.items() if v is not None}
    try:
        return cls(**params)
    except TypeError:
        raise ValueError(
            f"policy {name!r} does not take parameter(s) {', '.join(sorted(params))}"
        ) from None


__all__ = [
    "POLICIES",
    "ExitPolicy",
    "make_policy",
    "run_policy",
]
