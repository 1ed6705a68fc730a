"""Rules of the house that the code itself must keep (read with ``ast``, nothing imported).

"One module owns threads. Every cross-thread hop goes through it." The thread bridge,
``memryx/_core/threads.py``, is the only module of the package that starts a thread or
calls into another thread's loop; everything else calls its functions
(``start_thread``, ``call_soon``, ``run_in_loop`` / ``call_in_loop``, ``loop_future`` /
``await_future``, ``run_sync``, ``Runner``).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "memryx"

#: The modules allowed to start threads and to cross between them (paths from the root).
BRIDGE = frozenset({"memryx/_core/threads.py"})

#: Calls (and any other use but a type annotation) that start a thread or cross threads,
#: by their full name, with the bridge function to use instead.
BANNED_NAMES: dict[str, str] = {
    "threading.Thread": "start_thread",
    "threading.Timer": "start_thread",
    "_thread.start_new_thread": "start_thread",
    "_thread.start_new": "start_thread",
    "concurrent.futures.ThreadPoolExecutor": "run_sync or start_thread",
    "concurrent.futures.thread.ThreadPoolExecutor": "run_sync or start_thread",
    "asyncio.to_thread": "run_sync",
    "asyncio.run_coroutine_threadsafe": "run_in_loop or call_in_loop",
    "asyncio.wrap_future": "loop_future or await_future",
    "anyio.to_thread.run_sync": "run_sync",
    "anyio.from_thread.run": "Runner or call_in_loop",
    "anyio.from_thread.run_sync": "Runner or call_soon",
    "anyio.from_thread.start_blocking_portal": "Runner",
    "anyio.from_thread.BlockingPortal": "Runner",
    "multiprocessing.pool.ThreadPool": "run_sync or start_thread",
    "socketserver.ThreadingMixIn": "start_thread",
    "socketserver.ThreadingTCPServer": "start_thread",
    "socketserver.ThreadingUnixStreamServer": "start_thread",
    "http.server.ThreadingHTTPServer": "start_thread",
}

#: Methods of an event loop (any receiver) that hop threads, with what to use instead.
BANNED_METHODS: dict[str, str] = {
    "call_soon_threadsafe": "call_soon",
    "run_in_executor": "run_sync",
}

#: Modules whose import alone means crossing threads outside the bridge.
BANNED_MODULES: dict[str, str] = {
    "_thread": "start_thread",
    "anyio.to_thread": "run_sync",
    "anyio.from_thread": "Runner, call_in_loop or call_soon",
    "concurrent.futures.thread": "run_sync or start_thread",
    "multiprocessing.dummy": "run_sync or start_thread",
}

#: Third-party calls that start threads of their own, allowed where listed (and why).
THIRD_PARTY: dict[str, dict[str, str]] = {
    "start_http_server": {
        "memryx/device/_metrics.py": "prometheus_client serves /metrics on a daemon thread "
                                     "(and a thread per request) of its own",
    },
    "start_wsgi_server": {},
}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    what: str
    instead: str

    def __str__(self) -> str:
        return (f"{self.path}:{self.line}: {self.what} outside the thread bridge; use "
                f"memryx._core.threads.{self.instead}")


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the full dotted name it stands for, from every import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    root = a.name.split(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` with its root resolved through the module's imports, or None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside a type annotation (naming a thread type there is fine)."""
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.AnnAssign, ast.arg)) and node.annotation is not None:
            roots.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            roots.append(node.returns)
    return {id(n) for root in roots for n in ast.walk(root)}


def _type_checks(tree: ast.AST) -> set[int]:
    """ids of the class arguments of isinstance / issubclass calls."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2:
            ids.update(id(n) for n in ast.walk(node.args[1]))
    return ids


def violations(source: str, path: str) -> list[Violation]:
    """Every thread start or cross-thread call in ``source`` (the module at ``path``)."""
    tree = ast.parse(source, filename=path)
    aliases = _aliases(tree)
    skip = _annotation_nodes(tree) | _type_checks(tree)
    found: list[Violation] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in BANNED_MODULES:
                    found.append(Violation(path, line, f"import {a.name}",
                                           BANNED_MODULES[a.name]))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                for full in (node.module, f"{node.module}.{a.name}"):
                    if full in BANNED_MODULES:
                        found.append(Violation(path, line, f"from {node.module} import "
                                               f"{a.name}", BANNED_MODULES[full]))
                        break
        elif isinstance(node, ast.Attribute) and id(node) not in skip:
            if node.attr in BANNED_METHODS:
                found.append(Violation(path, line, f".{node.attr}", BANNED_METHODS[node.attr]))
            elif node.attr in THIRD_PARTY and path not in THIRD_PARTY[node.attr]:
                found.append(Violation(path, line, f".{node.attr} (a third-party thread)",
                                       "start_thread"))
            elif (full := _dotted(node, aliases)) in BANNED_NAMES:
                found.append(Violation(path, line, full, BANNED_NAMES[full]))
        elif isinstance(node, ast.Name) and id(node) not in skip \
                and isinstance(node.ctx, ast.Load) \
                and (full := aliases.get(node.id)) in BANNED_NAMES:
            found.append(Violation(path, line, f"{node.id} ({full})", BANNED_NAMES[full]))
    return sorted(set(found), key=lambda v: (v.line, v.what))


def _modules() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), p.read_text(encoding="utf-8"))
            for p in sorted(PACKAGE.rglob("*.py"))]


def test_only_the_thread_bridge_starts_threads_or_crosses_them() -> None:
    found = [v for path, source in _modules() if path not in BRIDGE
             for v in violations(source, path)]
    assert not found, ("One module owns threads (memryx/_core/threads.py); these bypass it:\n"
                       + "\n".join(str(v) for v in found))


def test_the_bridge_is_where_the_threads_are() -> None:
    """The allow-list is not stale: each bridge module exists and does cross threads."""
    sources = dict(_modules())
    for path in BRIDGE:
        assert path in sources, f"{path} is named as the thread bridge but does not exist"
        assert violations(sources[path], path), f"{path} starts no thread: drop it from BRIDGE"
    for name, allowed in THIRD_PARTY.items():
        for path in allowed:
            assert path in sources and f".{name}(" in sources[path], \
                f"{path} no longer calls {name}: drop it from THIRD_PARTY"


#: The primitives under the core and the only package modules each may import: the
#: bridge and the primitives sit below everything (devices and facades import them).
PRIMITIVES: dict[str, frozenset[str]] = {
    "memryx/_core/threads.py": frozenset({"memryx._exceptions", "memryx._lifecycle"}),
    "memryx/_core/aio.py": frozenset({"memryx._core.threads"}),
    "memryx/_core/workers.py": frozenset({"memryx._core.aio", "memryx._core.threads"}),
}


def _package_imports(source: str, path: str) -> dict[str, int]:
    """The package modules ``source`` imports (relative ones resolved), with a line each."""
    package = path.removesuffix(".py").split("/")[:-1]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "memryx" or name.startswith("memryx."):
                found.setdefault(name, node.lineno)
    return found


def test_the_bridge_and_the_primitives_import_nothing_above_them() -> None:
    sources = dict(_modules())
    wrong = [f"{path}:{line}: imports {name}"
             for path, allowed in PRIMITIVES.items()
             for name, line in _package_imports(sources[path], path).items()
             if name not in allowed]
    assert not wrong, "the core's primitives must stay at the bottom:\n" + "\n".join(wrong)


CAUGHT = '''\
import threading as th
import _thread
import asyncio
from asyncio import run_coroutine_threadsafe as rct
from concurrent import futures
from anyio.from_thread import BlockingPortal
import anyio.to_thread

t: th.Thread = th.Thread(target=print)
th.Timer(1.0, print).start()
loop.call_soon_threadsafe(print)
later = loop.call_soon_threadsafe
rct(coro(), loop)
futures.ThreadPoolExecutor(2)
class Worker(th.Thread): ...
await loop.run_in_executor(None, print)
await asyncio.wrap_future(f)
await anyio.to_thread.run_sync(print)
pc.start_http_server(8000)
from multiprocessing.pool import ThreadPool
ThreadPool(2)
class Server(socketserver.ThreadingMixIn, Base): ...
from multiprocessing import dummy
'''


def test_the_check_finds_each_way_to_start_or_cross_a_thread() -> None:
    found = violations(CAUGHT, "memryx/example.py")
    lines = sorted({v.line for v in found})
    assert lines == [2, 6, 7, *range(9, 20), 21, 22, 23], found
    message = "\n".join(str(v) for v in found)
    assert "memryx/example.py:9: threading.Thread outside the thread bridge; use " \
           "memryx._core.threads.start_thread" in message
    assert "memryx/example.py:11: .call_soon_threadsafe" in message


@pytest.mark.parametrize("source", [
    "import threading\nlock = threading.Lock()\nthreading.current_thread()\n",
    "import threading\ndef f(t: threading.Thread) -> list[threading.Thread]:\n    return [t]\n",
    "import threading\nok = isinstance(x, threading.Thread)\n",
    "from ._core.threads import start_thread\nstart_thread('n', print)\n",
    "import concurrent.futures\nf: concurrent.futures.Future[int] = concurrent.futures.Future()\n",
])
def test_the_check_leaves_the_rest_alone(source: str) -> None:
    assert violations(source, "memryx/example.py") == []


def test_the_import_check_resolves_relative_imports() -> None:
    source = ("from .. import _lifecycle\nfrom .aio import Channel\n"
              "from ..device.base import Device\nimport memryx.accl\nimport os\n")
    assert _package_imports(source, "memryx/_core/threads.py") == {
        "memryx._lifecycle": 1, "memryx._core.aio": 2, "memryx.device.base": 3,
        "memryx.accl": 4}
