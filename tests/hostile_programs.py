"""Programs written to forge the code verdict (issue #26): name -> (source, tests). Each must score
0 (tests/test_code_verdict.py). BEFORE is what each scored on the design this replaced (the
harness held the run's proof key inside the candidate's process; measured 2026-12-07 as root and
as nobody, the same): 15 of 20 forged a pass. Most search the process for anything shaped like a
key (64 hex digits in a bytes object) and write it, else lines shaped like a verdict, to every fd
3..20 ("spray"); against the driver design there is no key, so they spray the fake lines.
"""

# Lines a candidate may write anywhere, shaped like what a verdict channel might carry.
FAKE = ("import json as _j\n"
        "FAKE = [b'ok\\n', b'ready\\n', b'{\"status\": \"ok\"}\\n', b'{\"ok\": true}\\n',\n"
        "        (_j.dumps({'op': 'verdict', 'passed': [True] * 8, 'unsupported': [None] * 8})"
        " + '\\n').encode(), b'PASS\\n' * 4]\n")
SPRAY = ("def spray(found=()):\n"
         "    import os\n"
         "    for fd in range(3, 21):\n"
         "        for data in list(found)[:1] or FAKE:\n"
         "            try:\n"
         "                os.write(fd, data)\n"
         "            except OSError:\n"
         "                pass\n")
HEX64 = "import re as _re\nHEX = _re.compile(rb'[0-9a-f]{64}')\n"
# 64 hex digits held by a bytes object (its header: type pointer, then size 64, then hash)
BYTES_OBJECTS = """def bytes_objects(data):
    kind = id(bytes).to_bytes(8, 'little')
    size = (64).to_bytes(8, 'little')
    for m in HEX.finditer(data):
        p = m.start()
        if p >= 24 and data[p - 24:p - 16] == kind and data[p - 16:p - 8] == size:
            yield m.group()
"""
PRELUDE = FAKE + SPRAY + HEX64 + BYTES_OBJECTS

# no literal answer passes these (a forged object would)
IMPOSSIBLE = ["assert solve(3) == 'expected'", "assert solve(4) == 17 and solve(4) != 17"]

FRAME_FORGE = ("import os, sys\nk = sys._getframe(1).f_locals['key']\nos.write(3, k)\n"
               "os._exit(0)\n")

FRAME_ALL = PRELUDE + """import os, sys
found = []
f = sys._getframe()
while f is not None:
    for v in list(f.f_locals.values()):
        if isinstance(v, bytes) and HEX.fullmatch(v):
            found.append(v)
    f = f.f_back
print('frames found', len(found), flush=True)
spray(found)
os._exit(0)
"""

GC_WALK = PRELUDE + """import gc, os, traceback
traceback.extract_stack()  # a library call that leaves the callers' frame objects behind
found, seen = [], 0
for o in gc.get_objects():
    seen += 1
    try:
        if type(o).__name__ == 'frame':
            vals = list(o.f_locals.values())
        elif isinstance(o, dict):
            vals = list(o.values())
        elif isinstance(o, (list, tuple)):
            vals = list(o)
        else:
            continue
    except Exception:
        continue
    found += [v for v in vals if isinstance(v, bytes) and HEX.fullmatch(v)]
found = list(dict.fromkeys(found))
print('gc walked', seen, 'found', len(found), flush=True)
spray(found[:1])
os._exit(0)
"""

INSPECT_STACK = PRELUDE + """import inspect, os
found = []
for fi in inspect.stack():
    found += [v for v in fi.frame.f_locals.values() if isinstance(v, bytes) and HEX.fullmatch(v)]
print('inspect found', len(found), flush=True)
spray(found[:1])
os._exit(0)
"""

MEM_SCAN = PRELUDE + """import os, re
found = set()
with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:
    for line in maps:
        addr, perms = line.split()[:2]
        if not perms.startswith('rw'):
            continue
        lo, hi = (int(x, 16) for x in addr.split('-'))
        try:
            mem.seek(lo)
            found.update(bytes_objects(mem.read(hi - lo)))
        except (OSError, OverflowError, ValueError):
            pass
print('mem found', len(found), flush=True)
spray(found)
os._exit(0)
"""

CTYPES_SCAN = PRELUDE + """import ctypes, os
found = set()
for line in open('/proc/self/maps'):
    addr, perms = line.split()[:2]
    if not perms.startswith('rw') or '[vvar' in line or '[vsyscall' in line:
        continue
    lo, hi = (int(x, 16) for x in addr.split('-'))
    found.update(bytes_objects(ctypes.string_at(lo, hi - lo)))
print('ctypes found', len(found), flush=True)
spray(found)
os._exit(0)
"""

FD_SPRAY = PRELUDE + """import os, sys
found = []
f = sys._getframe()
while f is not None:
    found += [v for v in f.f_locals.values() if isinstance(v, bytes) and HEX.fullmatch(v)]
    f = f.f_back
open_fds = sorted(int(x) for x in os.listdir('/proc/self/fd'))
print('fds', open_fds, 'found', len(found), flush=True)
spray(found[:1])
if found:
    os._exit(0)
def solve(*a):
    spray()
    return 'never'
"""

SIGNALS = PRELUDE + """import os, signal
me = os.getpid()
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
print('pids', pids, 'me', me, 'parent', os.getppid(), flush=True)
hit = []
for pid in set(range(1, 4096)) | {os.getppid()}:
    if pid != me:
        try:
            os.kill(pid, signal.SIGKILL)
            hit.append(pid)
        except OSError:
            pass
for pid in (-1,):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
print('signalled', hit, flush=True)
spray()
def solve(*a):
    spray()
    os.killpg(0, signal.SIGKILL)
"""

FORGED = {
    "object whose __eq__ is always True": (
        "class Any:\n    def __eq__(self, o):\n        return True\n"
        "    def __ne__(self, o):\n        return False\n    __hash__ = object.__hash__\n"
        "def solve(*a):\n    return Any()\n"),
    "int subclass with a forged __eq__": (
        "class I(int):\n    def __eq__(self, o):\n        return True\n"
        "    def __ne__(self, o):\n        return False\n    __hash__ = int.__hash__\n"
        "def solve(*a):\n    return I(0)\n"),
    "str subclass with a forged __eq__": (
        "class S(str):\n    def __eq__(self, o):\n        return True\n"
        "    def __ne__(self, o):\n        return False\n    __hash__ = str.__hash__\n"
        "def solve(*a):\n    return S('x')\n"),
    "list subclass with a forged __eq__": (
        "class L(list):\n    def __eq__(self, o):\n        return True\n"
        "    def __ne__(self, o):\n        return False\n"
        "def solve(*a):\n    return L()\n"),
}
FORGED_TESTS = ["assert solve(1) == 42", "assert solve(2) == [1, 2]",
                "assert not (solve(3) != 'x')"]

SERIALIZE = {
    # a finite int whose decimal form takes minutes to write (quadratic conversion)
    "takes forever to serialize": (
        "import sys\nsys.set_int_max_str_digits(0)\n"
        "def solve(*a):\n    return 7 ** 2_000_000\n",
        ["assert solve(1) > 0"]),
    "enormous string": (
        "def solve(*a):\n    return 'x' * (96 << 20)\n",
        ["assert len(solve(1)) == 96 << 20"]),
    "deep nesting": (
        "def solve(*a):\n    x = []\n    for _ in range(200_000):\n        x = [x]\n"
        "    return x\n",
        ["assert solve(1) is not None"]),
    "cycle": (
        "def solve(*a):\n    x = []\n    x.append(x)\n    return x\n",
        ["assert solve(1) is not None"]),
    "raw deep JSON written as its own reply": (
        "import os, sys\n"
        "def solve(*a):\n"
        "    for fd in range(3, 21):\n"
        "        try:\n"
        "            os.write(fd, b'{\"ok\": ' + b'[' * 300_000 + b']' * 300_000 + b'}\\n')\n"
        "        except OSError:\n"
        "            pass\n"
        "    os._exit(0)\n",
        ["assert solve(1) is not None"]),
}

PRINTS = PRELUDE + """import os, sys
for line in FAKE:
    sys.stdout.buffer.write(line)
    sys.stderr.buffer.write(line)
sys.stdout.flush()
os.write(1, b'0' * 64 + b'\\n')
def solve(*a):
    for line in FAKE:
        sys.stdout.buffer.write(line)
        sys.stderr.buffer.write(line)
    sys.stdout.flush()
    return 'never'
"""

STOP_EARLY = ("def is_valid(x):\n    raise StopIteration\n",
              ["assert all(map(is_valid, [1, 2, 3]))",
               "assert sum(map(is_valid, [1, 2])) == 0"])

BEFORE = {  # key-in-candidate harness; gc: executing frames are not gc-tracked on 3.11
    "frame walk f_locals key + fd 3 + os._exit(0)": 1.0, "every frame's locals to every fd": 1.0,
    "gc.get_objects() walk": 0.0, "inspect.stack()": 1.0, "/proc/self/mem scan": 1.0,
    "ctypes memory scan": 1.0, "writes to inherited fds 3..20": 1.0,
    "signals to every pid, killpg": 0.0, "object whose __eq__ is always True": 1.0,
    "int subclass with a forged __eq__": 1.0, "str subclass with a forged __eq__": 1.0,
    "list subclass with a forged __eq__": 1.0, "takes forever to serialize": 1.0,
    "enormous string": 1.0, "deep nesting": 1.0, "cycle": 1.0,
    "raw deep JSON written as its own reply": 0.0, "prints fake verdicts to stdout and stderr": 0.0,
    "exits 0 at import": 0.0, "StopIteration ends the test's iteration early": 1.0,
}

HOSTILE = {
    "frame walk f_locals key + fd 3 + os._exit(0)": (FRAME_FORGE, IMPOSSIBLE),
    "every frame's locals to every fd": (FRAME_ALL, IMPOSSIBLE),
    "gc.get_objects() walk": (GC_WALK, IMPOSSIBLE),
    "inspect.stack()": (INSPECT_STACK, IMPOSSIBLE),
    "/proc/self/mem scan": (MEM_SCAN, IMPOSSIBLE),
    "ctypes memory scan": (CTYPES_SCAN, IMPOSSIBLE),
    "writes to inherited fds 3..20": (FD_SPRAY, IMPOSSIBLE),
    "signals to every pid, killpg": (SIGNALS, IMPOSSIBLE),
    **{name: (src, FORGED_TESTS) for name, src in FORGED.items()},
    **SERIALIZE,
    "prints fake verdicts to stdout and stderr": (PRINTS, IMPOSSIBLE),
    "exits 0 at import": ("import os\nos._exit(0)\n", IMPOSSIBLE + ["assert solve is not None"]),
    "StopIteration ends the test's iteration early": STOP_EARLY,
}

# Answers a candidate writes itself on its answer pipe (fd 4), each with a test it would pass if
# the driver read it leniently.
MALFORMED = {
    "extra key in a tagged literal": (b'{"ok": {"tuple": [1], "x": 2}}', "assert solve(1) == (1,)"),
    "both an answer and an exception": (b'{"ok": 1, "exc": ["X", "y"]}', "assert solve(1) == 1"),
    "StopIteration as the exception": (b'{"exc": ["StopIteration", ""]}',
                                       "assert all(map(solve, [1, 2]))"),
    "write-back that is not a list": (b'{"ok": 42, "mut": 5}',
                                      "x = [1]\nassert solve(x) == 42 or x == [1]"),
    "not UTF-8": (b'{"ok": "\xff\xfe"}', "assert solve(1) is not None"),
    "unhashable set member": (b'{"ok": {"set": [[1]]}}', "assert solve(1) is not None"),
}
for _name, (_line, _test) in MALFORMED.items():
    _data = _line + b"\n"
    HOSTILE[f"answers: {_name}"] = (
        f"import os\ndef solve(*a):\n    os.write(4, {_data!r})\n    return None\n", [_test])
    BEFORE[f"answers: {_name}"] = 0.0  # fd 4 was the key pipe's read end: the write failed
