"""Reading compiled programs in tests."""

import re


def dot_operand_types(hlo: str):
    """(lhs dtype, rhs dtype) of every dot in an optimised HLO module's text (names are unique)."""
    types = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))
    return [(types[a], types[b]) for a, b in re.findall(r" dot\(%(\S+?), %(\S+?)\)", hlo)]
