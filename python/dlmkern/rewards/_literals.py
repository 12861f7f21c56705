"""Literal values as JSON, for calls between the test driver and the candidate's call server
(`verdict.py`). Both sandbox programs start with this file's text (they import nothing from
dlmkern), and the trainer's tests import it.

Only plain values cross: None, bool, int, float, str as themselves; lists as arrays; tuple, set,
frozenset, dict, bytes and complex as one-key objects ({"tuple": [...]}, {"dict": [[k, v], ...]},
{"bytes": "hex"}, ...); a reference to an object that stays in the candidate's process as
{"ref": n}. Only exact types are literals: an int subclass, a list subclass or any object with
its own __eq__ crosses as a reference, which compares equal to nothing but itself. Decoding
builds fresh built-in objects and refuses anything else, so whatever the candidate writes, the
driver holds genuine literals. Pickle is never used.
"""

LITERAL_DEPTH = 200  # nesting beyond this does not cross (a cycle never does)
_SCALARS = (type(None), bool, int, float, str)


class NotALiteral(ValueError):
    """A value that cannot cross as a literal (too deep, or no reference allowed here)."""


class BadLiteral(ValueError):
    """Received JSON that is not a well-formed encoded literal."""


def encode_literal(value, ref, depth: int = 0):
    """JSON-able form of `value`; `ref(obj)` gives the reference number of a non-literal object
    (or raises NotALiteral)."""
    if depth > LITERAL_DEPTH:
        raise NotALiteral(f"nested deeper than {LITERAL_DEPTH}")
    kind, d = type(value), depth + 1
    if kind in _SCALARS:
        return value
    if kind is list:
        return [encode_literal(v, ref, d) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [encode_literal(v, ref, d) for v in value]}
    if kind is dict:
        return {"dict": [[encode_literal(k, ref, d), encode_literal(v, ref, d)]
                         for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    return {"ref": ref(value)}


def decode_literal(obj, ref, depth: int = 0):
    """The value `obj` (parsed JSON) encodes; `ref(n)` gives the object for reference n.
    Raises BadLiteral for anything not produced by encode_literal."""
    if depth > LITERAL_DEPTH:
        raise BadLiteral(f"nested deeper than {LITERAL_DEPTH}")
    kind, d = type(obj), depth + 1
    if kind in _SCALARS:
        return obj
    if kind is list:
        return [decode_literal(v, ref, d) for v in obj]
    if kind is not dict or len(obj) != 1:
        raise BadLiteral(f"not an encoded literal: {type(obj).__name__}")
    (tag, body), = obj.items()
    if tag in ("tuple", "set", "frozenset") and type(body) is list:
        items = [decode_literal(v, ref, d) for v in body]
        return tuple(items) if tag == "tuple" else set(items) if tag == "set" else \
            frozenset(items)
    if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2
                                                    for p in body):
        return {decode_literal(k, ref, d): decode_literal(v, ref, d) for k, v in body}
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and type(body) is list and len(body) == 2 and \
            all(type(x) in (int, float) for x in body):
        return complex(body[0], body[1])
    if tag == "ref" and type(body) is int and body >= 0:
        return ref(body)
    raise BadLiteral(f"not an encoded literal: tag {tag!r}")
