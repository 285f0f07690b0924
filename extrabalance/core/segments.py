"""Segment matching: which class of subscriber a profile belongs to (first match wins)."""

from __future__ import annotations

from collections.abc import Sequence

from extrabalance.core.model import AttributeValue, SubscriberProfile
from extrabalance.core.policy import Condition, RuleOp, Segment


def _attribute(profile: SubscriberProfile | None, name: str) -> AttributeValue | None:
    # A subscriber the operator never sent us is treated as brand new and poor:
    # tenure 0, ARPU 0, no custom attributes.
    if name == "tenure_days":
        return profile.tenure_days if profile else 0
    if name == "arpu_minor":
        return profile.arpu_minor if profile else 0
    if profile is None:
        return None
    return profile.attributes.get(name)


def _compare(left: AttributeValue, op: RuleOp, right: AttributeValue) -> bool:
    if op is RuleOp.EQ:
        return left == right
    if op is RuleOp.NE:
        return left != right
    # Ordering across types (int vs str) is meaningless: the condition is false.
    if isinstance(left, int) != isinstance(right, int):
        return False
    if op is RuleOp.GE:
        return left >= right  # type: ignore[operator]
    if op is RuleOp.GT:
        return left > right  # type: ignore[operator]
    if op is RuleOp.LE:
        return left <= right  # type: ignore[operator]
    if op is RuleOp.LT:
        return left < right  # type: ignore[operator]
    raise ValueError(f"operator {op!r} needs a single value")


def condition_holds(profile: SubscriberProfile | None, condition: Condition) -> bool:
    """True when the profile satisfies the condition; a missing attribute is false."""
    value = _attribute(profile, condition.attribute)
    if value is None:
        return False
    if condition.op is RuleOp.IN:
        options = condition.value if isinstance(condition.value, tuple) else (condition.value,)
        return value in options
    if isinstance(condition.value, tuple):
        return False
    return _compare(value, condition.op, condition.value)


def match_segment(profile: SubscriberProfile | None, segments: Sequence[Segment]) -> Segment | None:
    """The first segment whose conditions all hold, or None."""
    for segment in segments:
        if all(condition_holds(profile, c) for c in segment.conditions):
            return segment
    return None
