"""The candidate's call server (`verdict.py`): runs in the candidate's sandbox after
`_literals.py`'s text, as `python -c TEXT` (with the interpreter's site-packages, as a program of
a stdin/stdout test has). Everything in this process is the candidate's: nothing here decides a
reward, it only answers calls.

It runs main.py (the completion's code), writes "ready" on fd 4, then answers one JSON request
per line from fd 3 with one JSON line on fd 4: {"ok": value, "mut": [...], "mutkw": {...}} or
{"exc": [type name, message]}. Values cross as literals (`_literals.py`); any other object stays
here and crosses as a reference number into `objects`.
"""

if "encode_literal" not in globals():  # imported (tests), not run after _literals.py's text
    from dlmkern.rewards._literals import decode_literal, encode_literal


def _serve():
    import builtins
    import json
    import os

    ns = {"__name__": "__main__", "__builtins__": builtins}
    with open("main.py") as f:
        code = compile(f.read(), "main.py", "exec")
    exec(code, ns)  # an exception here ends the process: every test fails
    objects, numbers = [], {}

    def ref(obj):
        n = numbers.get(id(obj))
        if n is None:  # objects keeps every referenced object alive, so ids stay unique
            n = numbers[id(obj)] = len(objects)
            objects.append(obj)
        return n

    def take(n):
        return objects[n]

    def send(data):
        view = memoryview(data)
        while view:
            view = view[os.write(4, view):]

    send(b"ready\n")
    for line in os.fdopen(3, "rb"):
        try:
            reply = _answer(json.loads(line), ns, ref, take)
        except BaseException as e:  # noqa: BLE001 - the candidate's exception is its answer
            reply = {"exc": [type(e).__name__, str(e)[:500]]}
        try:
            data = json.dumps(reply, allow_nan=True)
        except BaseException as e:  # noqa: BLE001
            data = json.dumps({"exc": [type(e).__name__, str(e)[:500]]})
        send(data.encode() + b"\n")


def _answer(req, ns, ref, take):
    op = req["op"]
    if op == "get":
        if req["name"] not in ns:
            raise NameError(f"name {req['name']!r} is not defined")
        return {"ok": encode_literal(ns[req["name"]], ref)}
    target = take(req["ref"])
    args = [decode_literal(a, take) for a in req["args"]]
    kw = {k: decode_literal(v, take) for k, v in req["kw"].items()}
    if op == "call":
        value = target(*args, **kw)
    elif op == "getattr":
        value = getattr(target, *args)
    elif op == "setattr":
        value = setattr(target, *args)
    elif op == "bool":
        value = bool(target)
    elif op == "len":
        value = len(target)
    elif op == "iter":
        value = list(target)
    elif op == "getitem":
        value = target[args[0]]
    else:
        raise ValueError(f"unknown op {op!r}")
    return {"ok": encode_literal(value, ref),
            "mut": [encode_literal(args[i], ref) for i in req.get("mut", [])],
            "mutkw": {k: encode_literal(kw[k], ref) for k in req.get("mutkw", [])}}


if __name__ == "__main__":
    _serve()
