"""The trusted test driver (`verdict.py`): runs in its own sandbox, WITHOUT the candidate's code,
after `_literals.py`'s text, as `python -I -S -c TEXT`; tests.json in its working dir.

It executes each test's statements itself. A name the test uses but does not bind (and that is
neither a builtin nor a standard-library module the test uses as a module) is looked up in the
candidate's process: a literal comes back as a value, anything else as a `Remote`, a proxy whose
calls, attribute reads and writes, truth, len, iteration and indexing go to the candidate. Each
request goes to the trainer on fd 4 and its answer comes back on fd 3: a header line written by
the trainer ({"status": "ok" | "timeout" | "died" | "too_large"}), then, for a call answered in
time, the candidate's line, parsed as JSON and decoded as a literal (anything else fails the
test). Comparisons happen here, on literals: a proxy equals only itself. When every test ran, the
verdict goes to the trainer: {"op": "verdict", "passed": [...], "unsupported": [...]}.
"""

if "encode_literal" not in globals():  # imported (tests), not run after _literals.py's text
    from dlmkern.rewards._literals import BadLiteral, NotALiteral, decode_literal, encode_literal

import ast
import builtins
import json
import os
import sys

_MUTABLE = (list, dict, set)  # arguments the candidate may change in place: written back


class CallFailed(BaseException):
    """A request got no usable answer; the test fails even if its code catches this."""


class Unsupported(BaseException):
    """The test passes something that cannot cross to the candidate; it fails for everyone."""


class CandidateError(Exception):
    """The candidate raised an exception that is not a plain built-in one."""


class Channel:
    """Requests to the candidate through the trainer, and the current test's failures."""

    def __init__(self, rfd: int, wfd: int):
        self.rfile, self.wfd = os.fdopen(rfd, "rb"), wfd
        self.failure = self.unsupported = None
        self.remotes = {}

    def send(self, msg) -> None:
        try:
            data = json.dumps(msg).encode() + b"\n"
        except ValueError as e:  # e.g. an int too long to write out
            self.unsupported = f"passes a value that cannot be written out ({str(e)[:100]})"
            raise Unsupported(self.unsupported) from None
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]

    def _header(self) -> str:
        header = json.loads(self.rfile.readline())  # the trainer's line: trusted
        return header["status"]

    def begin(self, i: int) -> bool:
        """Starts test i; False when the candidate's program is not running (its import failed,
        hung or it died)."""
        self.failure = self.unsupported = None
        self.remotes = {}
        self.send({"op": "begin", "test": i})
        status = self._header()
        if status != "ok":
            self.failure = status
        return status == "ok"

    def ask(self, req) -> dict:
        if self.failure:  # the candidate was killed or broke the protocol in this test
            raise CallFailed(self.failure)
        self.send(req)
        status = self._header()
        if status != "ok":
            self.failure = status
            raise CallFailed(status)
        line = self.rfile.readline()
        try:
            reply = json.loads(line)
            if type(reply) is not dict or not (set(reply) == {"exc"} or "ok" in reply):
                raise BadLiteral("not a reply")
            return reply
        except (ValueError, RecursionError, MemoryError) as e:
            self.failure = f"malformed reply ({type(e).__name__})"
            raise CallFailed(self.failure) from None

    def value(self, reply, key="ok"):
        """A reply's decoded value; raises what the candidate raised."""
        if "exc" in reply:
            exc = _exception(reply["exc"])
            if isinstance(exc, CallFailed):
                self.failure = str(exc)
            raise exc
        try:
            return decode_literal(reply[key], self.remote)
        except (ValueError, TypeError, KeyError, RecursionError, MemoryError) as e:
            self.failure = f"malformed value ({type(e).__name__}: {str(e)[:100]})"
            raise CallFailed(self.failure) from None

    def remote(self, n: int):
        if n not in self.remotes:
            self.remotes[n] = Remote(self, n)
        return self.remotes[n]

    def encode(self, value):
        def ref(obj):
            if type(obj) is Remote and obj._Remote__channel is self:
                return obj._Remote__ref
            raise NotALiteral(f"a {type(obj).__name__}")
        try:
            return encode_literal(value, ref)
        except (NotALiteral, ValueError) as e:
            self.unsupported = f"passes a value that cannot cross to the program ({e})"
            raise Unsupported(self.unsupported) from None

    def get(self, name: str):
        return self.value(self.ask({"op": "get", "name": name}))

    def apply(self, ref: int, op: str, args=(), kw=None):
        """op on the candidate's object `ref`; arguments the candidate may change in place
        (lists, dicts, sets) come back and replace their contents here."""
        kw = kw or {}
        mut = [i for i, a in enumerate(args) if type(a) in _MUTABLE] if op == "call" else []
        mutkw = [k for k, v in kw.items() if type(v) in _MUTABLE] if op == "call" else []
        reply = self.ask({"op": op, "ref": ref, "args": [self.encode(a) for a in args],
                          "kw": {k: self.encode(v) for k, v in kw.items()},
                          "mut": mut, "mutkw": mutkw})
        result = self.value(reply)
        try:
            after = [(args[i], v) for i, v in zip(mut, reply["mut"] if mut else [], strict=True)]
            after += [(kw[k], reply["mutkw"][k]) for k in mutkw]
        except (KeyError, TypeError, ValueError):
            self.failure = "malformed write-back"
            raise CallFailed(self.failure) from None
        for arg, encoded in after:
            _write_back(self, arg, self.value({"ok": encoded}))
        return result


def _write_back(channel, arg, new) -> None:
    if type(new) is not type(arg):
        channel.failure = "write-back of another type"
        raise CallFailed(channel.failure)
    if type(arg) is list:
        arg[:] = new
    else:
        arg.clear()
        arg.update(new)


def _exception(exc):
    """The driver's exception for the candidate's [type name, message]: a built-in Exception
    subclass of that name (never StopIteration, which would end the test's own loops early),
    else CandidateError."""
    if type(exc) is not list or len(exc) != 2 or not all(type(x) is str for x in exc):
        return CallFailed("malformed exception")
    name, message = exc
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and \
            not issubclass(cls, (StopIteration, StopAsyncIteration)):
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs five arguments
            pass
    return CandidateError(f"{name}: {message}")


class Remote:
    """An object in the candidate's process. Equal only to itself; operations go there."""

    __slots__ = ("__channel", "__ref", "__weakref__")

    def __init__(self, channel, ref):
        object.__setattr__(self, "_Remote__channel", channel)
        object.__setattr__(self, "_Remote__ref", ref)

    def __call__(self, *args, **kw):
        return self.__channel.apply(self.__ref, "call", args, kw)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self.__channel.apply(self.__ref, "getattr", (name,))

    def __setattr__(self, name, value):
        self.__channel.apply(self.__ref, "setattr", (name, value))

    def __bool__(self):
        return _typed(self.__channel, self.__channel.apply(self.__ref, "bool"), bool)

    def __len__(self):
        return _typed(self.__channel, self.__channel.apply(self.__ref, "len"), int)

    def __iter__(self):
        return iter(_typed(self.__channel, self.__channel.apply(self.__ref, "iter"), list))

    def __getitem__(self, key):
        return self.__channel.apply(self.__ref, "getitem", (key,))

    def __repr__(self):
        return f"<candidate object {self.__ref}>"


def _typed(channel, value, kind):
    if type(value) is not kind or (kind is int and value < 0):
        channel.failure = f"{kind.__name__} expected"
        raise CallFailed(channel.failure)
    return value


class Names(dict):
    """A test's namespace: names it does not bind come from builtins, the standard library
    (modules the test uses as modules) or else the candidate."""

    def __init__(self, channel, modules):
        super().__init__(__name__="__main__", __builtins__=builtins)
        self.channel, self.modules = channel, modules

    def __missing__(self, name):
        if name in builtins.__dict__ or name.startswith("__"):
            raise KeyError(name)  # the driver's own builtin (or dunder), never the candidate's
        if name in self.modules:
            self[name] = __import__(name)
            return self[name]
        try:
            value = self.channel.get(name)
        except NameError:
            raise KeyError(name) from None
        if type(value) is Remote:
            self[name] = value
        return value


def module_names(tree) -> set:
    """Standard-library modules the test uses as modules (`math.sqrt`): the driver's own."""
    return {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in sys.stdlib_module_names}


def run_test(channel, i: int, source: str) -> bool:
    if not channel.begin(i):
        return False
    try:
        tree = ast.parse(source)
        exec(compile(tree, f"<test {i}>", "exec"), Names(channel, module_names(tree)))
        ok = True
    except BaseException:  # noqa: BLE001 - any exception fails the test, nothing else
        ok = False
    return ok and channel.failure is None and channel.unsupported is None


def main():
    with open("tests.json") as f:
        tests = json.load(f)
    channel = Channel(3, 4)
    passed, unsupported = [], []
    for i, source in enumerate(tests):
        passed.append(run_test(channel, i, source))
        unsupported.append(channel.unsupported)
    channel.send({"op": "verdict", "passed": passed, "unsupported": unsupported})


if __name__ == "__main__":
    main()
