"""`JaxprView`: one view of a jaxpr, calls inlined, scan bodies entered, producers and consumers."""

import jax
import jax.numpy as jnp

from jq.flax.dataflow import JaxprView


def _model(w, x):
    h = jax.jit(lambda a, b: a @ b)(x, w)  # a dot inside a call

    def body(c, v):
        return jnp.tanh(c @ w) * v, c.sum()  # w: a scan constant; v: one row per iteration

    c, ys = jax.lax.scan(body, h, jnp.ones((3, 4)))
    return c, ys


def test_calls_are_inlined_and_scans_are_entered():
    w, x = jnp.ones((4, 4)), jnp.ones((2, 4))
    view = JaxprView(jax.make_jaxpr(_model)(w, x).jaxpr)
    w_ref, x_ref = view.input_refs
    assert all(n.prim not in ("pjit", "jit") for n in view.nodes)  # calls are not nodes
    dots = [n for n in view.nodes if n.prim == "dot_general"]
    assert len(dots) == 2
    call_dot, body_dot = dots
    # the call's body reads the caller's references: x and w reach the dot directly
    assert call_dot.ins[:2] == [x_ref, w_ref] and len(call_dot.path) == 2 and not call_dot.scans
    (scan,) = [n for n in view.nodes if n.prim == "scan"]
    body = view.scans[id(scan.eqn)]
    assert body.node is scan and body.length == 3
    nc = body.num_consts
    assert body.num_carry == 1
    assert w_ref in scan.ins[:nc] and body.body_in[:nc] == scan.ins[:nc]  # constants: shared
    assert not set(body.body_in[nc:]) & set(scan.ins)  # carry and rows: fresh references
    # the scan carry starts as the call's output
    assert view.producer[scan.ins[nc]] is call_dot
    # body nodes come before the scan, know their scan, and see the constant w
    inside = [n for n in view.nodes if n.scans]
    assert inside and all(n.scans == (id(scan.eqn),) for n in inside)
    assert max(view.nodes.index(n) for n in inside) < view.nodes.index(scan)
    assert body_dot in inside and body_dot.ins[1] == w_ref and body_dot.path[:-1] == scan.path
    assert body_dot in view.consumers[w_ref] and scan in view.consumers[w_ref]
    (tanh,) = [n for n in inside if n.prim == "tanh"]
    assert view.producer[tanh.ins[0]] is body_dot
    # the model's outputs are the scan's outputs
    assert view.output_refs == scan.outs
    assert view.by_path[scan.path] is scan
