"""One rule per op family (see :mod:`onnxslim.graph.rules.base` for the interface).

:func:`default_rules` builds the rule set of every module here; callers pass a rule set to ``slim``,
``prune`` and ``inspect_model`` (``rules=``) and may extend it with :meth:`RuleSet.with_rules`.
"""

from __future__ import annotations

import functools

import onnx

from onnxslim.graph.rules import (
    conv,
    dynquant,
    elementwise,
    layout,
    linear,
    norm,
    qoperator,
    quant,
    reduce,
    spatial,
)
from onnxslim.graph.rules.base import BarrierRule, Rule, RuleSet, module_rules, op_key, register

RULE_MODULES = (conv, dynquant, elementwise, layout, linear, norm, qoperator, quant, reduce, spatial)


@functools.cache
def default_rules() -> RuleSet:
    """The rule set of every rule module in this package (built once; a :class:`RuleSet` is immutable)."""
    return RuleSet(rule for module in RULE_MODULES for rule in module_rules(module))


def rule_for(node: onnx.NodeProto) -> Rule:
    """The rule of ``node`` in :func:`default_rules` (a barrier for unknown ops)."""
    return default_rules().rule_for(node)


def known_op_types() -> list[str]:
    """Op types of the default ONNX domain that :func:`default_rules` models."""
    return default_rules().known_op_types()


__all__ = ["BarrierRule", "Rule", "RuleSet", "default_rules", "known_op_types", "module_rules", "op_key",
           "register", "rule_for"]
