"""Collectives in compiled HLO text: how many of each kind, and how many bytes they produce.

``count_collectives(compiled.as_text())`` reads the text of a compiled, SPMD-partitioned module (``jax.jit(f)
.lower(...).compile().as_text()``) and counts its ``all-gather``, ``all-reduce``, ``reduce-scatter``,
``all-to-all`` and ``collective-permute`` instructions. An asynchronous pair (``all-gather-start`` /
``all-gather-done``) is one collective: only its ``-done`` half is counted. A collective that XLA wraps in an
``async-start`` computation is counted once, at the wrapped instruction. ``ragged-all-to-all`` counts as
``all-to-all``.

Counts are static by default: an instruction inside a ``while`` body (a ``lax.scan`` over layers or
micro-batches) counts once, however many times the loop runs. ``executed=True`` counts what one run of the module
executes instead: each instruction times the ``known_trip_count`` of every ``while`` loop around it (1 where XLA
records none), every branch of a ``conditional`` once (an upper bound), and nothing in a computation that the entry
never calls.

:func:`collective_bytes` adds up, per kind, the bytes of each collective's result as the HLO prints it: the
per-device shape after partitioning (an all-gather's gathered array, a reduce-scatter's scattered piece, an
all-reduce's reduced array; every element of a tuple-shaped, combined collective). A shape whose element type is
unknown (a token, an opaque type) adds 0.
"""

from __future__ import annotations

import dataclasses
import math
import re

#: The kinds reported, in this order.
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# opcode -> kind; the "-start" halves of async pairs are absent on purpose (their "-done" is counted).
_OPCODES = {
    "all-gather": "all-gather",
    "all-gather-done": "all-gather",
    "all-reduce": "all-reduce",
    "all-reduce-done": "all-reduce",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all",
    "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-permute-done": "collective-permute",
}

# "  ROOT %name.1 = <shape> opcode(" (the "%" is optional in newer printers); the shape may be a tuple with spaces.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[0-9,\s]*)\]")

_DTYPE_BITS = {
    "pred": 8,
    "s2": 2,
    "u2": 2,
    "s4": 4,
    "u4": 4,
    "s8": 8,
    "u8": 8,
    "s16": 16,
    "u16": 16,
    "s32": 32,
    "u32": 32,
    "s64": 64,
    "u64": 64,
    "f16": 16,
    "bf16": 16,
    "f32": 32,
    "f64": 64,
    "c64": 64,
    "c128": 128,
    "f8e4m3fn": 8,
    "f8e5m2": 8,
    "f8e4m3": 8,
    "f8e4m3fnuz": 8,
    "f8e4m3b11fnuz": 8,
    "f8e5m2fnuz": 8,
    "f8e3m4": 8,
    "f8e8m0fnu": 8,
    "f4e2m1fn": 4,
}


# "%name (params) -> shape {" or "ENTRY %name (...) -> ... {" at column 0 opens a computation; "}" closes it.
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_CALLEE = re.compile(
    r"\b(?P<attr>body|condition|calls|to_apply|true_computation|false_computation)=%?(?P<name>[\w.\-]+)"
)
_BRANCHES = re.compile(r"\bbranch_computations=\{(?P<names>[^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of an HLO module: its ``kind`` (one of :data:`KINDS`), the opcode as printed, the bytes of
    its result per device (:func:`shape_bytes`), the computation that holds it, and how many times one run of the
    module executes it (``executions``: the product of the enclosing loops' trip counts, see the module docstring)."""

    kind: str
    opcode: str
    bytes: int
    computation: str = ""
    executions: int = 1


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: ``f32[8,16]{1,0}`` -> 512, a tuple ``(f32[2]{0}, bf16[4]{0})`` -> the sum of its
    arrays (16), ``pred[]`` -> 1. Sub-byte types round up per array; unknown element types count 0."""
    total = 0
    for m in _ARRAY.finditer(shape):
        bits = _DTYPE_BITS.get(m.group("dtype"))
        if bits is None:
            continue
        dims = [int(d) for d in m.group("dims").replace(" ", "").split(",") if d]
        total += (math.prod(dims) * bits + 7) // 8
    return total


def _executions(calls: dict[str, list[tuple[str, int]]], entry: str | None) -> dict[str, int]:
    """Times one run of the module executes each computation, from ``calls`` (computation -> [(callee, times per
    execution)]); None for ``entry`` (no ENTRY in the text): every computation once."""
    if entry is None:
        return dict.fromkeys(calls, 1)
    callers = {name: 0 for name in calls}
    for edges in calls.values():
        for callee, _ in edges:
            callers[callee] = callers.get(callee, 0) + 1
    runs = dict.fromkeys(callers, 0)
    runs[entry] = 1
    ready = [name for name, n in callers.items() if n == 0]  # the call graph is acyclic (HLO has no recursion)
    while ready:
        name = ready.pop()
        for callee, times in calls.get(name, []):
            runs[callee] += runs[name] * times
            callers[callee] -= 1
            if callers[callee] == 0:
                ready.append(callee)
    return runs


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of ``hlo_text``, in text order (async pairs once, at their ``-done``), with
    the computation holding it and its executions per run of the module."""
    found: list[tuple[str, str, int, str]] = []
    calls: dict[str, list[tuple[str, int]]] = {}
    entry, current = None, ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header is not None:
            current = header.group("name")
            calls.setdefault(current, [])
            if header.group("entry"):
                entry = current
            continue
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        trips = _TRIP_COUNT.search(line)
        for callee in _CALLEE.finditer(line):
            times = int(trips.group("n")) if trips and callee.group("attr") == "body" else 1
            calls.setdefault(current, []).append((callee.group("name"), times))
        branches = _BRANCHES.search(line)
        if branches is not None:
            for name in branches.group("names").split(","):
                calls.setdefault(current, []).append((name.strip().lstrip("%"), 1))
        kind = _OPCODES.get(m.group("op"))
        if kind is not None:
            found.append((kind, m.group("op"), shape_bytes(m.group("shape")), current))
    runs = _executions(calls, entry)
    return [Collective(kind, op, size, comp, runs.get(comp, 1)) for kind, op, size, comp in found]


def count_collectives(hlo_text: str, *, executed: bool = False) -> dict[str, int]:
    """``{kind: number of instructions}`` for every kind of :data:`KINDS` (0 when absent) in ``hlo_text``;
    ``executed``: weighted by how many times one run executes each (see the module docstring)."""
    counts = dict.fromkeys(KINDS, 0)
    for c in collectives(hlo_text):
        counts[c.kind] += c.executions if executed else 1
    return counts


def collective_bytes(hlo_text: str, *, executed: bool = False) -> dict[str, int]:
    """``{kind: summed result bytes per device}`` for every kind of :data:`KINDS` (see the module docstring);
    ``executed``: each collective's bytes times its executions per run."""
    sizes = dict.fromkeys(KINDS, 0)
    for c in collectives(hlo_text):
        sizes[c.kind] += c.bytes * (c.executions if executed else 1)
    return sizes
