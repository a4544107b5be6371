"""One rule per op family (see :mod:`onnxslim.graph.rules.base` for the interface).

Importing this package registers every rule; ``rule_for(node)`` returns the node's rule, or a barrier.
"""

from onnxslim.graph.rules import conv, elementwise, layout, linear, norm, reduce, spatial  # noqa: F401  (registration)
from onnxslim.graph.rules.base import BarrierRule, Rule, known_op_types, register, rule_for

__all__ = ["BarrierRule", "Rule", "known_op_types", "register", "rule_for"]
