"""torch.compile sees the chain ops as single ops: a model of over-parameterized layers compiles with
fullgraph=True (no graph break) and matches eager, forward and backward, on both associations."""

import copy

import pytest
import torch
import torch.nn as nn

import fastrank
from tolerance import assert_close


@pytest.mark.parametrize("batch", [3, 2000], ids=["activation-chain", "collapsed"])
def test_compile_fullgraph_matches_eager(batch):
    torch.manual_seed(0)
    model = nn.Sequential(
        fastrank.OverparamLinear(16, 32, depth=3), nn.ReLU(), fastrank.OverparamLinear(32, 8, depth=2)
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(batch, 16, requires_grad=True)
    xe = x.detach().clone().requires_grad_(True)
    out, ref = compiled(x), eager(xe)
    assert_close(out, ref, torch.float32, 32, steps=5)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_close(x.grad, xe.grad, torch.float32, batch, steps=5, what="grad x")
    for (name, p), pe in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, pe.grad, torch.float32, batch, steps=5, what=f"grad {name}")
    model.eval()
    eager.eval()
    with torch.no_grad():
        assert_close(compiled(x), eager(x), torch.float32, 32, steps=5, what="eval")


def test_compile_sees_the_custom_op_not_the_eager_function():
    # Eager calls run a torch.autograd.Function (no dispatcher cost); a compiled graph must hold the
    # custom op itself, with its fake kernel and registered autograd.
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(16, 16, depth=3)
    torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(3, 16, requires_grad=True))
    assert any("fastrank.chain_matmul" in target for target in seen), seen
