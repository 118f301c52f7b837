"""Deps-maps: validation, ordering and argument injection.

A deps-map names the dependencies a reactor needs before it runs::

    {"one": {"topic": "add", "args": [1, 2, 3]},
     "two": {"topic": "subtract", "args": [2], "arg_in_fn": "cons", "deps": ["one"]}}

Each dep is sent to its ``topic`` with its ``args`` as the request's ``data``,
after the results of its ``deps`` were injected, in the order ``deps`` lists
them, with ``arg_in_fn(args, result)``.  The deps-map travels inside Celery
messages, so ``arg_in_fn`` is a *name*: ``conj`` (append, the default), ``cons``
(prepend), or one registered with :func:`register_arg_in_fn`.  A dep's request is
keyed by its ``key`` when it has one, else by its own id, so that a topic's
requests spread over its partitions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from typing import Any

from .channels import CHANNELS
from .dialects import DIALECTS
from .errors import DepsMapError
from .protocol import valid_topic_name

__all__ = ["Dep", "DepsGraph", "register_arg_in_fn", "arg_in_fns", "inject"]

ArgInFn = Callable[[Any, Any], Any]

_ARG_IN_FNS: dict[str, ArgInFn] = {}


def register_arg_in_fn(name: str, fn: ArgInFn | None = None) -> Any:
    """Register ``fn(args, result) -> new_args`` under ``name`` for use as a dep's ``arg_in_fn``.

    Works as a decorator (``@register_arg_in_fn("merge")``) or a call.  The
    function must be registered in every process that runs dispatching
    subtasks (import it from a module listed in ``fusion_imports``).

    Parameters:
        name: the name deps-maps use.
        fn: the function; omitted when used as a decorator.

    Returns:
        ``fn``, or a decorator.

    Raises:
        TypeError: ``fn`` is not callable.
    """
    def deco(f: ArgInFn) -> ArgInFn:
        if not callable(f):
            raise TypeError(f"arg_in_fn {name!r} must be callable")
        _ARG_IN_FNS[name] = f
        return f
    return deco(fn) if fn is not None else deco


def arg_in_fns() -> dict[str, ArgInFn]:
    """The registered injection functions by name."""
    return dict(_ARG_IN_FNS)


register_arg_in_fn("conj", lambda args, result: [*args, result])
register_arg_in_fn("cons", lambda args, result: [result, *args])

_KEYS = {"topic", "args", "deps", "arg_in_fn", "timeout", "key", "reply", "dialect"}
_ALIASES = {"arg-in-fn": "arg_in_fn"}
_BUILTIN_SEQUENCE_FNS = {"conj", "cons"}


@dataclass(frozen=True)
class Dep:
    """One validated dependency.

    ``key`` is the Kafka key of the dep's request: None keys it by the request's id
    (the dispatching subtask's id), which spreads a topic's requests over its
    partitions; a key of the caller's keeps the requests that share it on one partition.
    ``reply`` is the dep's reply channel (:mod:`fusion_celery.channels`; None: its
    reactor's or pipeline's, else ``fusion_reply_channel``).  ``dialect`` is the
    request/reply convention its service speaks (:mod:`fusion_celery.dialects`; None:
    fusion's): ``spring`` or ``faust`` send the request in that service's own form and
    read its answer so.
    """

    name: str
    topic: str
    args: Any = field(default_factory=list)
    deps: tuple[str, ...] = ()
    arg_in_fn: str = "conj"
    timeout: float | None = None
    key: str | None = None
    reply: str | None = None
    dialect: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "topic": self.topic, "args": self.args,
                             "deps": list(self.deps), "arg_in_fn": self.arg_in_fn}
        if self.timeout is not None:
            d["timeout"] = self.timeout
        if self.key is not None:
            d["key"] = self.key
        if self.reply is not None:
            d["reply"] = self.reply
        if self.dialect is not None:
            d["dialect"] = self.dialect
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Dep:
        return cls(d["name"], d["topic"], d.get("args", []), tuple(d.get("deps", ())),
                   d.get("arg_in_fn", "conj"), d.get("timeout"), d.get("key"), d.get("reply"),
                   d.get("dialect"))


def _dep(name: Any, spec: Any, names: set[str], max_timeout: float | None) -> Dep:
    where = f"deps-map[{name!r}]"
    if not isinstance(name, str) or not name:
        raise DepsMapError(f"{where}: a dep's name must be a non-empty string")
    if not isinstance(spec, Mapping):
        raise DepsMapError(f"{where}: must be a mapping with at least 'topic', got {type(spec).__name__}")
    spec = {_ALIASES.get(k, k): v for k, v in spec.items()}
    unknown = sorted(set(spec) - _KEYS - {"result"}, key=repr)  # keys may be of any (mixed) types
    if unknown:
        raise DepsMapError(f"{where}: unknown key(s) {unknown}; a dep takes {sorted(_KEYS)}")
    if "topic" not in spec:
        raise DepsMapError(f"{where}: missing 'topic'")
    topic = spec["topic"]
    if not valid_topic_name(topic):
        raise DepsMapError(f"{where}.topic: {topic!r} is not a legal Kafka topic name")

    deps = spec.get("deps") or []
    if isinstance(deps, str) or not isinstance(deps, (list, tuple)):
        raise DepsMapError(f"{where}.deps: must be a list of dep names, got {type(deps).__name__}")
    for i, d in enumerate(deps):
        if not isinstance(d, str):
            raise DepsMapError(f"{where}.deps[{i}]: dep names are strings, got {d!r}")
        if d == name:
            raise DepsMapError(f"{where}.deps[{i}]: a dep cannot depend on itself (cycle: {name} -> {name})")
        if d not in names:
            raise DepsMapError(f"{where}.deps[{i}]: unknown dep {d!r} (known: {sorted(names, key=repr)})")
    if len(set(deps)) != len(deps):
        raise DepsMapError(f"{where}.deps: lists a dep twice: {list(deps)}")

    fn = spec.get("arg_in_fn") or "conj"
    if not isinstance(fn, str):
        raise DepsMapError(f"{where}.arg_in_fn: must be the name of a registered function, got "
                           f"{type(fn).__name__} (callables cannot travel in Celery messages)")
    if fn not in _ARG_IN_FNS:
        raise DepsMapError(f"{where}.arg_in_fn: unknown function {fn!r} (registered: {sorted(_ARG_IN_FNS)})")

    args = spec.get("args", [])
    if isinstance(args, tuple):
        args = list(args)
    if deps and fn in _BUILTIN_SEQUENCE_FNS and not isinstance(args, list):
        raise DepsMapError(f"{where}.args: must be a list for {fn!r} to inject into, got {type(args).__name__}")
    try:
        json.dumps(args, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise DepsMapError(f"{where}.args: not JSON-serializable ({str(exc)[:200]})") from None

    timeout = spec.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0 \
                or (isinstance(timeout, float) and not math.isfinite(timeout)) or timeout > 10**9:
            raise DepsMapError(f"{where}.timeout: must be a positive number of seconds, got {timeout!r}")
        if max_timeout is not None and timeout > max_timeout:
            raise DepsMapError(f"{where}.timeout: {timeout}s is longer than the chord lifetime "
                               f"result_chord_expires={max_timeout:.0f}s; raise that setting first")
        timeout = float(timeout)

    key = spec.get("key")
    if key is not None and not isinstance(key, str):
        raise DepsMapError(f"{where}.key: must be a string (the Kafka key of the dep's request) or None, "
                           f"got {type(key).__name__}")
    reply = spec.get("reply")
    if reply is not None and reply not in CHANNELS:
        raise DepsMapError(f"{where}.reply: unknown reply channel {reply!r} (one of {', '.join(CHANNELS)})")
    dialect = spec.get("dialect")
    if dialect is not None and dialect not in DIALECTS:
        raise DepsMapError(f"{where}.dialect: unknown dialect {dialect!r} (one of {', '.join(DIALECTS)})")
    return Dep(name, topic, args, tuple(deps), fn, timeout, key, reply, None if dialect == "fusion" else dialect)


class DepsGraph:
    """A validated deps-map with its topological order.

    Parameters:
        deps_map: name -> ``{topic, args, deps, arg_in_fn, timeout, key, reply, dialect}``.
        max_timeout: the longest ``timeout`` a dep may ask for (seconds; None: no limit).

    Raises:
        DepsMapError: naming the culprit: an unknown dep, a cycle (with its path), a
            missing or illegal topic, an unknown ``arg_in_fn``, args of the wrong type,
            a bad timeout.
    """

    def __init__(self, deps_map: Mapping[str, Any], max_timeout: float | None = None) -> None:
        if not isinstance(deps_map, Mapping):
            raise DepsMapError(f"a deps-map must be a mapping of name to dep, got {type(deps_map).__name__}")
        names = set(deps_map)
        self.deps: dict[str, Dep] = {n: _dep(n, s, names, max_timeout) for n, s in deps_map.items()}
        sorter = TopologicalSorter({n: d.deps for n, d in self.deps.items()})
        try:
            sorter.prepare()
        except CycleError as exc:
            cycle = exc.args[1]
            raise DepsMapError(f"deps-map has a cycle: {' -> '.join(map(str, cycle))}") from None
        self.levels: list[list[str]] = []
        while sorter.is_active():
            ready = sorted(sorter.get_ready())
            self.levels.append(ready)
            sorter.done(*ready)
        self.order = [n for level in self.levels for n in level]

    def __len__(self) -> int:
        return len(self.deps)

    def components(self) -> list[list[list[str]]]:
        """The weakly connected components, each as its list of topological levels.

        Disjoint components run as parallel chains; inside one component a level
        waits for the whole previous level (see docs, "How a deps-map runs").
        """
        parent = {n: n for n in self.deps}

        def find(n: str) -> str:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for n, d in self.deps.items():
            for m in d.deps:
                parent[find(n)] = find(m)
        groups: dict[str, list[list[str]]] = {}
        for level in self.levels:
            per_root: dict[str, list[str]] = {}
            for n in level:
                per_root.setdefault(find(n), []).append(n)
            for root, names in per_root.items():
                groups.setdefault(root, []).append(names)
        return sorted(groups.values(), key=lambda levels: levels[0][0])

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart."""
        lines = ["flowchart LR"]
        for n in self.order:
            d = self.deps[n]
            lines.append(f'    {_ident(n)}["{n}<br/>topic: {d.topic}"]')
        for n in self.order:
            for m in self.deps[n].deps:
                lines.append(f"    {_ident(m)} --> {_ident(n)}")
        lines.append('    proc(["proc_fn"])')
        for n in self.order:
            if not any(n in d.deps for d in self.deps.values()):
                lines.append(f"    {_ident(n)} --> proc")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """The graph in Graphviz DOT."""
        lines = ["digraph deps {", "    rankdir=LR;"]
        for n in self.order:
            lines.append(f'    {json.dumps(n)} [label={json.dumps(n + chr(10) + "topic: " + self.deps[n].topic)}];')
        for n in self.order:
            for m in self.deps[n].deps:
                lines.append(f"    {json.dumps(m)} -> {json.dumps(n)};")
        lines.append('    "proc_fn" [shape=box];')
        for n in self.order:
            if not any(n in d.deps for d in self.deps.values()):
                lines.append(f'    {json.dumps(n)} -> "proc_fn";')
        lines.append("}")
        return "\n".join(lines)


def _ident(name: str) -> str:
    return "d_" + "".join(c if c.isalnum() else f"_{ord(c):x}_" for c in name)


def inject(dep: Dep, results: Mapping[str, Any]) -> Any:
    """``dep.args`` with the results of ``dep.deps`` injected, in the order ``deps`` lists them."""
    fn = _ARG_IN_FNS.get(dep.arg_in_fn)
    if fn is None:
        raise DepsMapError(f"deps-map[{dep.name!r}].arg_in_fn: unknown function {dep.arg_in_fn!r} in this "
                           f"process (registered: {sorted(_ARG_IN_FNS)}); import the module that registers it")
    args = dep.args
    for d in dep.deps:
        args = fn(args, results[d])
    return args
