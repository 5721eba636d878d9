"""One view of a traced model's jaxpr: every primitive equation, with its producers and consumers.

Every value of the jaxpr gets a reference ``("v", n)`` (literals: ``("lit",
value)``). Call-like equations (jit, remat, custom_jvp, ...) are inlined: the
body's inputs and outputs *are* the caller's references, so producers and
consumers are seen through calls. A `scan` is both a node (an opaque consumer
of its inputs, a producer of its outputs) and the scan body's nodes, which are
listed before it: the body's constant inputs are the caller's references, its
carry and per-iteration inputs fresh ones (`ScanBody` pairs them).

Each node knows its equation index path (``(i, j, ...)``, calls and scan bodies
entered), its module path (the `SCOPE_PREFIX` named scopes) and the scans it
lies in. The site finder (`jq.flax._graph.SiteFinder`), the float16 policy
(`jq.flax.cast_policy`) and the PTQ dataflows (`jq.flax.gptq`,
`jq.flax.smoothquant`) all read this one view.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.extend.core as jcore

__all__ = ["JaxprView", "Node", "ScanBody", "inner_jaxpr", "scan_counts", "scope_path"]

SCOPE_PREFIX = "jq="
# call-like primitives whose body is inlined
_CALL_PARAM = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


def inner_jaxpr(eqn):
    """``(jaxpr, consts)`` of a call-like equation's body, or None for other equations."""
    key = _CALL_PARAM.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    j = eqn.params[key]
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, j.consts
    return j, ()


def scan_counts(params) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a `scan` equation, on every supported JAX.

    Up to jax 0.10 they are the ``num_consts`` / ``num_carry`` parameters; jax
    0.11 replaced them with ``ft_in``, a flat tree of the three input groups
    ``(consts, carry, xs)`` whose ``unpack()`` gives the groups.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    if "ft_in" in params:
        consts, carry, _ = (len(g) for g in params["ft_in"].unpack())
        return consts, carry
    raise KeyError(
        f"jq: unrecognised scan parameters {sorted(params)} (this JAX is newer than jq's "
        "tested versions; see jq.ops.int8_dot.TESTED_JAX_VERSIONS)"
    )


def scope_path(eqn, default: str) -> str:
    """The innermost module path an equation was labelled with (``SCOPE_PREFIX`` scopes)."""
    ns = str(eqn.source_info.name_stack)
    found = [seg for seg in ns.split("/") if seg.startswith(SCOPE_PREFIX)]
    if not found:
        return default
    return found[-1][len(SCOPE_PREFIX) :].replace(":", "/")


@dataclasses.dataclass
class Node:
    """One primitive equation of the view."""

    path: tuple[int, ...]  # equation index path (calls and scan bodies entered)
    eqn: Any
    ins: list  # references of the inputs
    outs: list  # references of the outputs
    module: str  # module path (named scopes)
    scans: tuple[int, ...]  # ids of the enclosing scan equations, outermost first

    @property
    def prim(self) -> str:
        return self.eqn.primitive.name

    @property
    def context(self) -> tuple[int, ...]:
        """The path of the call or scan body the equation lies in (``()``: top level)."""
        return self.path[:-1]


@dataclasses.dataclass
class ScanBody:
    """A scan equation's body: its input references (consts: the caller's) and outputs."""

    node: Node  # the scan equation itself
    body_in: list  # consts (the caller's references), then carry and xs (fresh)
    body_out: list  # carry out, then ys
    num_consts: int
    num_carry: int
    length: int


class JaxprView:
    """Every primitive equation of a jaxpr, calls inlined, with producers and consumers.

    Attributes:
      nodes: the equations in evaluation order (a scan's body before the scan).
      input_refs / output_refs: references of the jaxpr's inputs and outputs.
      producer: ``{ref: Node}``; consumers: ``{ref: [Node, ...]}`` (body nodes
        included: a scan's constant is consumed by the scan and by its body).
      scans: ``{id(scan eqn): ScanBody}``.
      by_path: ``{path: Node}``.
      ref_of: ``{jaxpr Var: ref}`` for every variable met (the last binding of a
        body traced more than once).
    """

    def __init__(self, jaxpr):
        self.nodes: list[Node] = []
        self.scans: dict[int, ScanBody] = {}
        self.ref_of: dict = {}
        self._n = 0
        self.input_refs = [self._fresh() for _ in jaxpr.invars]
        consts = [self._fresh() for _ in jaxpr.constvars]
        self.output_refs = self._walk(jaxpr, self.input_refs, consts, (), "", ())
        self.producer: dict = {}
        self.consumers: dict = {}
        for n in self.nodes:
            for r in n.outs:
                self.producer[r] = n
            for r in n.ins:
                if r[0] == "v":
                    self.consumers.setdefault(r, []).append(n)
        self.by_path = {n.path: n for n in self.nodes}

    def _fresh(self):
        self._n += 1
        return ("v", self._n)

    def ref(self, v):
        """The reference of a jaxpr atom (a Var met during the walk, or a Literal)."""
        return ("lit", v.val) if isinstance(v, jcore.Literal) else self.ref_of[v]

    def _walk(self, jaxpr, in_refs, const_refs, prefix, scope, scans) -> list:
        self.ref_of.update(zip(jaxpr.invars, in_refs))
        self.ref_of.update(zip(jaxpr.constvars, const_refs))
        for i, eqn in enumerate(jaxpr.eqns):
            path = prefix + (i,)
            here = scope_path(eqn, scope)
            ins = [self.ref(v) for v in eqn.invars]
            inner = inner_jaxpr(eqn)
            if inner is not None:
                j, _ = inner
                consts = [self._fresh() for _ in j.constvars]
                outs = self._walk(j, ins, consts, path, here, scans)
            else:
                outs = [self._fresh() for _ in eqn.outvars]
                node = Node(path, eqn, ins, outs, here, scans)
                if eqn.primitive.name == "scan":
                    self._scan(node)
                self.nodes.append(node)
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    self.ref_of[v] = o
        return [self.ref(v) for v in jaxpr.outvars]

    def _scan(self, node: Node):
        eqn = node.eqn
        closed = eqn.params["jaxpr"]
        nc, nk = scan_counts(eqn.params)
        body_in = node.ins[:nc] + [self._fresh() for _ in node.ins[nc:]]
        consts = [self._fresh() for _ in closed.jaxpr.constvars]
        inner_scans = node.scans + (id(eqn),)
        body_out = self._walk(closed.jaxpr, body_in, consts, node.path, node.module, inner_scans)
        self.scans[id(eqn)] = ScanBody(node, body_in, body_out, nc, nk, eqn.params["length"])
