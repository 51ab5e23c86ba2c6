import contextlib
import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastrank
import fastrank.chain as chain_mod
import fastrank.layers.base as layers_base
import fastrank.layers.convert as layers_convert
import fastrank.layers.convolution as layers_conv
import fastrank.layers.linear as layers_linear
import fastrank.layers.preserve as layers_preserve
from fastrank import OverparamConv2d, OverparamLinear, collapse, overparameterize
from tolerance import assert_close

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def naive_linear(layer, x):
    """The sequential chain of the anchor library: one F.linear per factor."""
    h = x
    for factor in layer.factors:
        h = F.linear(h, factor)
    return h + layer.bias if layer.bias is not None else h


def force_linear_path(monkeypatch, path):
    costs = (0, 1) if path == "activation" else (1, 0)
    monkeypatch.setattr(chain_mod, "chain_costs", lambda *a, **k: costs)
    monkeypatch.setattr(layers_linear, "chain_costs", lambda *a, **k: costs)


def force_conv_path(monkeypatch, path):
    costs = (0, 1) if path == "activation" else (1, 0)
    monkeypatch.setattr(layers_conv, "conv_chain_costs", lambda *a, **k: costs)


# ---- OverparamLinear ------------------------------------------------------------------------


def test_linear_shapes_and_init():
    layer = OverparamLinear(5, 8, depth=3, width=0.5)
    assert [tuple(f.shape) for f in layer.factors] == [(4, 5), (4, 4), (8, 4)]
    assert layer.weight.shape == (8, 5) and layer.bias.shape == (8,)
    assert layer.hidden_features == 4
    big = OverparamLinear(512, 512, depth=2)
    # Kaiming-normal fan_in: std 1/sqrt(fan_in) inside the chain, sqrt(2/fan_in) on the last.
    assert abs(big.factors[0].std().item() * 512**0.5 - 1.0) < 0.02
    assert abs(big.factors[1].std().item() * 256**0.5 - 1.0) < 0.02


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["activation", "collapsed"])
@pytest.mark.parametrize(
    "in_f,out_f,depth,shape",
    [(1, 1, 1, (3, 1)), (7, 129, 2, (1, 7)), (129, 7, 3, (2, 3, 129)), (17, 17, 4, (5, 17))],
    ids=str,
)
def test_linear_forward_and_grads_match_naive_chain(monkeypatch, dtype, path, in_f, out_f, depth, shape):
    force_linear_path(monkeypatch, path)
    torch.manual_seed(0)
    layer = OverparamLinear(in_f, out_f, depth=depth, dtype=torch.float64)
    x64 = torch.randn(*shape, dtype=torch.float64)
    ref_layer = copy.deepcopy(layer)  # fp64 reference on the same (rounded) values
    layer = layer.to(dtype)
    with torch.no_grad():
        for ref_f, f in zip(ref_layer.factors, layer.factors):
            ref_f.copy_(f.double())
        ref_layer.bias.copy_(layer.bias.double())
    x = x64.to(dtype).requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    out = layer(x)
    ref = naive_linear(ref_layer, xr)
    width = max(in_f, out_f)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, width, steps=depth, what="output")
    assert_close(out, F.linear(x, layer.weight, layer.bias), dtype, width, steps=depth, what="vs F.linear")
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    reduction = max(width, x.numel() // in_f)
    assert_close(x.grad, xr.grad, dtype, reduction, steps=depth, what="grad x")
    for j, (f, rf) in enumerate(zip(layer.factors, ref_layer.factors)):
        assert_close(f.grad, rf.grad, dtype, reduction, steps=depth, what=f"grad factor {j}")
    assert_close(layer.bias.grad, ref_layer.bias.grad, dtype, reduction, what="grad bias")


@pytest.mark.parametrize("batch", [3, 4000], ids=["activation-by-cost", "collapsed-by-cost"])
def test_linear_fp64_grads_equal_naive_to_1e10(batch):
    # Unforced: the cost model picks the path; the result must be the naive chain's to 1e-10.
    torch.manual_seed(1)
    layer = OverparamLinear(24, 24, depth=4, dtype=torch.float64)
    ref_layer = copy.deepcopy(layer)
    x = torch.randn(batch, 24, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(batch, 24, dtype=torch.float64)
    layer(x).backward(grad_out)
    naive_linear(ref_layer, xr).backward(grad_out)
    for a, b, what in [(x.grad, xr.grad, "x")] + [
        (f.grad, r.grad, f"factor {j}") for j, (f, r) in enumerate(zip(layer.factors, ref_layer.factors))
    ]:
        err = ((a - b).norm() / b.norm()).item()
        assert err <= 1e-10, f"grad {what}: relative error {err:.2e}"


def test_linear_non_contiguous_input():
    torch.manual_seed(2)
    layer = OverparamLinear(7, 5, depth=3, dtype=torch.float64)
    x = torch.randn(7, 11, dtype=torch.float64).T  # (11, 7), transposed
    assert not x.is_contiguous()
    assert_close(layer(x), naive_linear(layer, x.contiguous()), torch.float64, 7)
    x = torch.randn(4, 9, 14, dtype=torch.float64)[:, ::3, ::2]  # strided (4, 3, 7)
    assert_close(layer(x), naive_linear(layer, x.contiguous()), torch.float64, 7)


def test_linear_eval_caches_and_never_goes_stale():
    torch.manual_seed(3)
    layer = OverparamLinear(6, 6, depth=3)
    assert layer.eval() is layer
    x = torch.randn(4, 6)
    with torch.no_grad():
        first = layer(x)
        cached = layer._cache.value
        assert cached is not None
        assert torch.equal(layer(x), first) and layer._cache.value is cached  # served from the cache
        assert torch.equal(first, F.linear(x, layer.weight, layer.bias))

    # An optimizer step updates the factors in place.
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        after_step = layer(x)
    assert not torch.allclose(after_step, first)
    assert torch.allclose(after_step, naive_linear(layer, x).detach(), rtol=1e-5, atol=1e-6)

    # load_state_dict copies in place.
    other = OverparamLinear(6, 6, depth=3)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(layer(x), naive_linear(other, x), rtol=1e-5, atol=1e-6)

    # .to() makes new tensors.
    layer = layer.to(torch.float64)
    with torch.no_grad():
        out64 = layer(x.double())
    assert out64.dtype == torch.float64
    assert torch.allclose(out64, naive_linear(layer, x.double()), rtol=1e-10)


def test_linear_eval_with_grad_still_trains_factors():
    layer = OverparamLinear(5, 3, depth=2).eval()
    layer(torch.randn(2, 5)).sum().backward()
    assert all(f.grad is not None for f in layer.factors)


def test_linear_state_dict_round_trip_exact():
    torch.manual_seed(4)
    layer = OverparamLinear(7, 9, depth=3, batch_norm=True)
    layer(torch.randn(16, 7))  # moves running stats
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = OverparamLinear(7, 9, depth=3, batch_norm=True)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for (name, a), (_, b) in zip(layer.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name
    assert sorted(layer.state_dict()) == sorted(restored.state_dict())
    x = torch.randn(5, 7)
    assert torch.equal(layer.eval()(x), restored.eval()(x))


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_residual_collapses_into_weight(depth):
    torch.manual_seed(5)
    layer = OverparamLinear(6, 6, depth=depth, residual=True, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    # Reference: node_m = W_m node_{m-1} (+ node_{m-2} at every even m).
    nodes = [x]
    for m, factor in enumerate(layer.factors, start=1):
        h = F.linear(nodes[-1], factor)
        if m % 2 == 0:
            h = h + nodes[m - 2]
        nodes.append(h)
    ref = nodes[-1] + layer.bias
    assert_close(layer(x), ref, torch.float64, 6)
    assert_close(F.linear(x, layer.weight, layer.bias), ref, torch.float64, 6)
    with torch.no_grad():
        assert_close(layer.eval()(x), ref, torch.float64, 6)


@pytest.mark.parametrize("residual", [False, True])
def test_batch_norm_folds_in_eval(residual):
    torch.manual_seed(6)
    layer = OverparamLinear(8, 8, depth=4, batch_norm=True, residual=residual, dtype=torch.float64)
    for _ in range(3):
        layer(torch.randn(32, 8, dtype=torch.float64) * 3 + 1)
    for norm in layer.norms:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
    layer.eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    nodes = [x]
    for m, (factor, norm) in enumerate(zip(layer.factors, layer.norms), start=1):
        h = norm(F.linear(nodes[-1], factor))
        if residual and m % 2 == 0:
            h = h + nodes[m - 2]
        nodes.append(h)
    ref = nodes[-1] + layer.bias
    assert_close(F.linear(x, *layer.collapsed_parameters()), ref, torch.float64, 8)
    with torch.no_grad():
        assert_close(layer(x), ref, torch.float64, 8)


def test_batch_norm_trains_through_activation_chain():
    torch.manual_seed(7)
    layer = OverparamLinear(4, 4, depth=2, batch_norm=True, dtype=torch.float64)
    x = torch.randn(10, 4, dtype=torch.float64)
    ref = layer.norms[1](F.linear(layer.norms[0](F.linear(x, layer.factors[0])), layer.factors[1]))
    ref = ref + layer.bias
    out = layer(x)
    assert_close(out, ref, torch.float64, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_features=0, out_features=3), r"in_features must be a positive int, got 0"),
        (dict(in_features=3, out_features=3, depth=0), r"depth must be a positive int, got 0"),
        (dict(in_features=3, out_features=3, width=0), r"width must be a finite number > 0, got 0"),
        (dict(in_features=3, out_features=3, width=-1.5), r"got -1.5"),
        (dict(in_features=3, out_features=3, width=0.1), r"hidden size int\(3 \* 0.1\) = 0"),
        (dict(in_features=3, out_features=5, residual=True), r"skip into node 2 needs equal widths, got 3 -> 5"),
        (dict(in_features=3, out_features=3, depth=1, residual=True), r"needs depth >= 2"),
    ],
    ids=["in0", "depth0", "width0", "width-neg", "width-tiny", "residual-shape", "residual-depth"],
)
def test_linear_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OverparamLinear(**kwargs)


def test_linear_bad_input():
    layer = OverparamLinear(4, 3)
    with pytest.raises(ValueError, match=r"in_features=4 at dim -1, got shape \(2, 5\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        layer(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="expected input of dtype torch.float32 like the layer, got torch.float64"):
        layer(torch.ones(2, 4, dtype=torch.float64))


def test_nan_propagates():
    layer = OverparamLinear(4, 3)
    x = torch.randn(2, 4)
    x[0, 1] = float("nan")
    out = layer(x)
    assert out[0].isnan().all() and not out[1].isnan().any()
    with torch.no_grad():
        out = layer.eval()(x)
    assert out[0].isnan().all() and not out[1].isnan().any()


# ---- OverparamConv2d ------------------------------------------------------------------------


def naive_conv(layer, x):
    """The chain of convolutions: padding once on the input, stride on the last factor."""
    left, right, top, bottom = layer._pad
    mode = {"zeros": "constant"}.get(layer.padding_mode, layer.padding_mode)
    h = F.pad(x, (left, right, top, bottom), mode=mode)
    for j, factor in enumerate(layer.factors):
        last = j == layer.depth - 1
        h = F.conv2d(h, factor, layer.bias if last else None, layer.stride if last else 1, 0,
                     layer.dilation, layer.groups)
    return h


CONV_CASES = [
    dict(),
    dict(kernel_sizes=(3, 3, 1), padding=1),
    dict(kernel_sizes=((3, 5), 1, (1, 3)), stride=2, padding=(2, 1), dilation=2, groups=2),
    dict(kernel_sizes=(3, 1), stride=(2, 1), padding="valid", groups=4),
    dict(kernel_sizes=(3, (2, 2)), padding="same", padding_mode="reflect"),
    dict(kernel_sizes=(3, 3), padding=1, padding_mode="circular", dilation=(1, 2)),
    dict(kernel_sizes=(1, 3), padding=2, padding_mode="replicate", stride=3, width=0.5, groups=2),
    dict(kernel_sizes=5),
]


@pytest.mark.parametrize("path", ["activation", "collapsed"])
@pytest.mark.parametrize("kwargs", CONV_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_conv_equals_conv2d_with_collapsed_kernel(monkeypatch, path, kwargs):
    force_conv_path(monkeypatch, path)
    torch.manual_seed(8)
    layer = OverparamConv2d(4, 8, dtype=torch.float64, **kwargs)
    ref = nn.Conv2d(4, 8, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                    dilation=layer.dilation, groups=layer.groups, padding_mode=layer.padding_mode,
                    dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(layer.bias)
    x = torch.randn(2, 4, 13, 11, dtype=torch.float64).transpose(2, 3)  # non-contiguous (2,4,11,13)
    x.requires_grad_(True)
    out = layer(x)
    expected = ref(x)
    assert_close(out, expected, torch.float64, 4 * 25)
    # Gradients equal those of the naive chain of convolutions.
    xr = x.detach().clone().requires_grad_(True)
    chain = naive_conv(layer, xr)
    assert_close(out, chain, torch.float64, 4 * 25, what="vs naive chain")
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, *layer.factors, layer.bias], grad_out)
    theirs = torch.autograd.grad(chain, [xr, *layer.factors, layer.bias], grad_out)
    for j, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, torch.float64, 2 * 11 * 13 * 8, what=f"grad {j}")


def test_conv_unbatched_and_eval():
    torch.manual_seed(9)
    layer = OverparamConv2d(3, 5, kernel_sizes=(3, 3), padding=2)  # collapsed 5x5
    x = torch.randn(3, 7, 7)
    out = layer(x)
    assert out.shape == (5, 7, 7)
    with torch.no_grad():
        ev = layer.eval()(x)
    assert torch.allclose(ev, out, rtol=1e-5, atol=1e-5)


def test_conv_cost_model_prefers_chain_for_large_images():
    layer = OverparamConv2d(64, 64, kernel_sizes=(3, 3, 1), padding=2)
    costs = layers_conv.conv_chain_costs(
        8, (128, 128), layer.channels, layer.kernel_sizes, stride=(1, 1), dilation=(1, 1),
        groups=1, padding=layer._pad, backward=False, kernel_cached=True,
    )
    assert costs[0] < costs[1], "a (3, 3, 1) chain beats its 5x5 collapsed kernel"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(groups=3), ValueError, r"groups=3 must divide in_channels=4"),
        (dict(kernel_sizes=(3, 0)), ValueError, r"kernel_sizes entries must be positive"),
        (dict(kernel_sizes=()), ValueError, r"non-empty sequence"),
        (dict(stride=0), ValueError, r"stride must be an int >= 1"),
        (dict(padding="same", stride=2), ValueError, r"padding='same' needs stride 1"),
        (dict(padding_mode="mirror"), ValueError, r"padding_mode must be one of"),
        (dict(width=0), ValueError, r"width must be a finite number > 0, got 0"),
    ],
    ids=["groups", "kernel0", "kernel-empty", "stride0", "same-stride", "padmode", "width0"],
)
def test_conv_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        OverparamConv2d(4, 8, **kwargs)


def test_conv_bad_input():
    layer = OverparamConv2d(4, 8)
    with pytest.raises(ValueError, match=r"in_channels=4 at dim 1, got shape \(2, 3, 5, 5\)"):
        layer(torch.randn(2, 3, 5, 5))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 4, 5, 5, dtype=torch.int32))


# ---- overparameterize / collapse --------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, (3, 1), stride=2, padding=(1, 0), groups=2), nn.ReLU(),
            nn.Conv2d(8, 6, 1, bias=False),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 7, 10), nn.ReLU(), nn.Linear(10, 3))

    def forward(self, x):
        return self.head(self.features(x))


def test_overparameterize_replaces_layers_and_keeps_dtype():
    torch.manual_seed(10)
    model = SmallCNN().double()
    out = overparameterize(model, depth=3, width=2.0, exclude=("head.3",))
    assert out is model
    assert isinstance(model.features[0], OverparamConv2d) and model.features[0].depth == 3
    assert model.features[2].groups == 2 and model.features[2].kernel_size == (3, 1)
    assert isinstance(model.head[1], OverparamLinear) and model.head[1].hidden_features == 20
    assert type(model.head[3]) is nn.Linear
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(2, 3, 8, 14, dtype=torch.float64)).shape == (2, 3)
    only_fc = overparameterize(SmallCNN(), include=(nn.Linear,), exclude=(nn.Conv2d,))
    assert type(only_fc.features[0]) is nn.Conv2d and isinstance(only_fc.head[1], OverparamLinear)


def test_preserve_and_collapse_round_trip():
    torch.manual_seed(11)
    plain = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 14, dtype=torch.float64)
    expected = plain(x)
    model = overparameterize(copy.deepcopy(plain), depth=3, preserve=True).eval()
    assert isinstance(model.features[2], OverparamConv2d)
    assert_close(model(x), expected, torch.float64, 200, what="preserve")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(x).square().mean().backward()
    opt.step()
    model.eval()
    trained = model(x)
    collapsed = collapse(model)
    assert not any(isinstance(m, (OverparamLinear, OverparamConv2d)) for m in collapsed.modules())
    assert_close(collapsed(x), trained, torch.float64, 200, what="collapse")
    # The collapsed state_dict loads into a model that knows nothing of fastrank.
    fresh = SmallCNN().double().eval()
    fresh.load_state_dict(collapsed.state_dict())
    assert_close(fresh(x), trained, torch.float64, 200, what="reloaded")


def test_collapse_folds_batch_norm_and_top_level_layer():
    torch.manual_seed(12)
    layer = OverparamLinear(5, 5, depth=3, batch_norm=True, bias=False)
    layer(torch.randn(20, 5))
    layer.eval()
    plain = collapse(layer)
    assert type(plain) is nn.Linear and plain.bias is not None
    x = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.allclose(plain(x), layer(x), atol=1e-5)


def test_preserve_fails_below_rank_with_layer_name():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"'0'.*rank 8.*narrowest hidden width is 4"):
        overparameterize(model, width=0.5, preserve=True)


def test_preserve_bottleneck_above_rank_is_exact():
    torch.manual_seed(13)
    low_rank = nn.Linear(8, 8, dtype=torch.float64)
    with torch.no_grad():
        low_rank.weight.copy_(torch.randn(8, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64))
    x = torch.randn(4, 8, dtype=torch.float64)
    expected = low_rank(x)
    layer = overparameterize(low_rank, depth=2, width=0.5, preserve=True)
    assert isinstance(layer, OverparamLinear)
    assert_close(layer(x), expected, torch.float64, 8)


def test_public_names():
    for name in ["OverparamLinear", "OverparamConv2d", "overparameterize", "OverparamReport", "collapse", "__version__"]:
        assert hasattr(fastrank, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["activation", "collapsed"])
def test_conv_each_dtype_against_fp64_chain(monkeypatch, dtype, path):
    force_conv_path(monkeypatch, path)
    torch.manual_seed(14)
    layer = OverparamConv2d(3, 6, kernel_sizes=(3, (1, 3), 1), padding=1, groups=3, dtype=dtype)
    ref_layer = copy.deepcopy(layer).double()
    x = torch.randn(2, 3, 9, 7).to(dtype).requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    out, ref = layer(x), naive_conv(ref_layer, xr)
    assert out.dtype == dtype
    reduction = 1 * 3 * 5 * 3
    assert_close(out, ref, dtype, reduction, steps=3, what="output")
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    assert_close(x.grad, xr.grad, dtype, reduction * 2, steps=3, what="grad x")
    for j, (f, rf) in enumerate(zip(layer.factors, ref_layer.factors)):
        assert_close(f.grad, rf.grad, dtype, 2 * 9 * 7 * 2, steps=3, what=f"grad factor {j}")


def test_autocast_like_nn_linear_and_cache_stays_fp32():
    torch.manual_seed(15)
    layer = OverparamLinear(16, 8, depth=3)
    conv = OverparamConv2d(3, 4, kernel_sizes=(3, 1), padding=1)
    x, image = torch.randn(5, 16), torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        conv_out = conv(image)
    assert out.dtype == torch.bfloat16 and conv_out.dtype == torch.bfloat16
    assert_close(out, naive_linear(layer, x), torch.bfloat16, 16, steps=3)
    assert_close(conv_out, naive_conv(conv, image), torch.bfloat16, 27, steps=2)
    layer.eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        assert layer._cache.value[0].dtype == torch.float32
        assert layer(x).dtype == torch.float32  # the cache made under autocast serves fp32 calls


# ---- eval cache: layout and inference mode ----------------------------------------------------


@pytest.mark.parametrize(
    "make,shape",
    [(lambda: OverparamLinear(7, 5, depth=3), (3, 7)),
     (lambda: OverparamConv2d(3, 6, kernel_sizes=(3, (1, 3), 1), padding=1, groups=3), (2, 3, 9, 7))],
    ids=["linear", "conv"],
)
def test_eval_cache_is_contiguous(make, shape):
    torch.manual_seed(16)
    layer = make().eval()
    with torch.no_grad():
        layer(torch.randn(*shape))
    weight, _ = layer._cache.value
    assert weight.is_contiguous(), f"cached weight strides {weight.stride()}"
    assert torch.equal(weight, layer.collapsed_parameters()[0].detach())


@pytest.mark.parametrize(
    "make,shape",
    [(lambda: OverparamLinear(7, 5, depth=3, dtype=torch.float64), (3, 7)),
     (lambda: OverparamConv2d(3, 4, kernel_sizes=(3, 1), padding=1, dtype=torch.float64), (2, 3, 7, 5)),
     (lambda: OverparamLinear(6, 6, depth=2, batch_norm=True, dtype=torch.float64), (4, 6))],
    ids=["linear", "conv", "linear-batch-norm"],
)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_cache_filled_under_inference_mode_serves_autograd_later(make, shape, frozen):
    torch.manual_seed(17)
    layer = make().eval()
    for p in layer.parameters():
        p.requires_grad_(not frozen)
    with torch.inference_mode():
        first = layer(torch.randn(*shape, dtype=torch.float64))
    assert first.is_inference()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)  # the cache (if used) was filled in inference mode
    grad_out = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, [x], grad_out)
    weight, bias = layer.collapsed_parameters()
    xr = x.detach().clone().requires_grad_(True)
    if isinstance(layer, OverparamConv2d):
        ref = F.conv2d(xr, weight.detach(), bias.detach(), padding=1)
    else:
        ref = F.linear(xr, weight.detach(), bias.detach())
    (grad_ref,) = torch.autograd.grad(ref, [xr], grad_out)
    assert_close(out, ref, torch.float64, 9, what="output")
    assert_close(grad_x, grad_ref, torch.float64, 9, what="grad x")


# ---- overparameterize on the patterns of real models --------------------------------------------


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight is standardized per output channel in forward."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow 'SAME' padding computed from the input size in forward."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, (*pads[1], *pads[0]))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class HFConv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D: a linear layer with the weight stored (in, out)."""

    def __init__(self, out_features, in_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) * 0.02)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class TinyBiT(nn.Module):
    """A BiT / EfficientNet-like stem: a StdConv2d, a Conv2dSame, then plain layers."""

    def __init__(self):
        super().__init__()
        self.stem = StdConv2d(3, 8, 3, padding=1, bias=False)
        self.down = Conv2dSame(8, 8, 3, stride=2)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.conv(F.relu(self.down(F.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class TiedLM(nn.Module):
    """An embedding, a block, and a head tied to the embedding (GPT-2 style)."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Linear(dim, dim)
        self.attn_proj = HFConv1D(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn_proj(torch.tanh(self.mlp(h)))
        return self.head(h)


class ResidualConvNet(nn.Module):
    """A residual conv net with BatchNorm (resnet basic block), odd channel counts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7), nn.ReLU())
        self.conv1 = nn.Conv2d(7, 7, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(7)
        self.conv2 = nn.Conv2d(7, 7, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(7)
        self.down = nn.Sequential(nn.Conv2d(7, 9, 1, stride=2, bias=False), nn.BatchNorm2d(9))
        self.fc = nn.Linear(9, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.relu(self.down(x)).mean((2, 3)))


def _randomize_batch_norms(model):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)


def test_subclasses_are_skipped_and_reported_by_default():
    torch.manual_seed(20)
    model = TinyBiT().double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"stem \(StdConv2d\): subclass of nn.Conv2d.*down \(Conv2dSame\)"):
        model, report = overparameterize(model, preserve=True, return_report=True)
    assert type(model.stem) is StdConv2d and type(model.down) is Conv2dSame
    assert isinstance(model.conv, OverparamConv2d) and isinstance(model.head, OverparamLinear)
    assert report.replaced == [("conv", "Conv2d"), ("head", "Linear")]
    assert [(n, k) for n, k, _ in report.skipped] == [("stem", "StdConv2d"), ("down", "Conv2dSame")]
    assert "include=(..., StdConv2d)" in report.skipped[0][2]
    assert "skipped  stem (StdConv2d)" in str(report)
    assert_close(model(x), expected, torch.float64, 72, what="preserved model")


@pytest.mark.parametrize(
    "subclass,match",
    [(StdConv2d, r"layer 'stem' \(StdConv2d\): relative error \d\.\d+e[-+]\d+ on a probe input"),
     (Conv2dSame, r"layer 'down' \(Conv2dSame\): on a probe input of shape \(2, 8, \d+, \d+\) the "
                  r"original gives \(2, 8, \d+, \d+\), the replacement \(2, 8, \d+, \d+\)")],
    ids=["StdConv2d", "Conv2dSame"],
)
def test_preserve_raises_naming_a_subclass_whose_function_changes(subclass, match):
    torch.manual_seed(21)
    model = TinyBiT()
    with pytest.raises(ValueError, match=match):
        overparameterize(model, include=(nn.Linear, nn.Conv2d, subclass), preserve=True)


def test_subclass_replaced_when_asked_without_preserve():
    model = TinyBiT()
    with pytest.warns(UserWarning, match=r"left 1 layers.*down \(Conv2dSame\)"):
        overparameterize(model, include=(nn.Conv2d, StdConv2d))
    assert isinstance(model.stem, OverparamConv2d) and type(model.down) is Conv2dSame
    assert type(model.head) is nn.Linear


def test_preserve_keeps_a_residual_batch_norm_net_and_checks_every_layer(monkeypatch):
    torch.manual_seed(22)
    model = ResidualConvNet().double()
    _randomize_batch_norms(model)
    model.eval()
    x = torch.randn(3, 3, 11, 7, dtype=torch.float64)
    expected = model(x)
    checked = []
    original_check = layers_preserve._check_same_function
    monkeypatch.setattr(layers_convert, "_check_same_function",
                        lambda o, r, where: checked.append(where) or original_check(o, r, where))
    model, report = overparameterize(model, depth=3, preserve=True, return_report=True)
    assert checked == ["'stem.0'", "'conv1'", "'conv2'", "'down.0'", "'fc'"]
    assert len(report.replaced) == 5 and report.skipped == []
    assert_close(model(x), expected, torch.float64, 63, steps=3, what="preserved")
    assert_close(collapse(model)(x), expected, torch.float64, 63, steps=3, what="collapsed")


def test_check_same_function_detects_a_changed_weight():
    torch.manual_seed(23)
    layer = nn.Linear(9, 4)
    replacement = overparameterize(copy.deepcopy(layer), preserve=True)
    with torch.no_grad():
        replacement.factors[0][0, 0] += 1e-3 * replacement.factors[0].abs().max()
    with pytest.raises(ValueError, match=r"layer 'probe' \(Linear\): relative error"):
        layers_preserve._check_same_function(layer, replacement, "'probe'")


def test_unsupported_types_and_tied_head_are_reported_and_kept():
    torch.manual_seed(24)
    model = nn.ModuleDict({
        "lm": TiedLM(),
        "conv1d": nn.Conv1d(3, 4, 3),
        "conv3d": nn.Conv3d(3, 4, 3),
        "deconv": nn.ConvTranspose2d(3, 4, 3),
    })
    with pytest.warns(UserWarning, match="left 3 layers as they are") as caught:
        _, report = overparameterize(model, return_report=True)
    skipped = {name: why for name, _, why in report.skipped}
    # only linear maps are reported: not the embedding, nor a module of the user's own that merely
    # holds a 2-D weight
    assert set(skipped) == {"lm.head", "conv3d", "deconv"}, skipped
    assert skipped["conv3d"] == (
        "type not replaced by fastrank (nn.Linear, nn.Conv1d, nn.Conv2d and transformers' Conv1D are); "
        "exclude it to silence this"
    )
    assert skipped["deconv"].startswith("transposed convolution: fastrank composes chains of forward convolutions only")
    assert skipped["lm.head"].startswith(
        "weight tied to 'lm.embed.weight'; replacing it would untie them: untie them first to replace it "
        "(Hugging Face models: tie_word_embeddings=False in the config), or exclude it"
    )
    for name in skipped:
        assert name in str(caught[0].message)
    assert [name for name, _ in report.replaced] == ["lm.mlp", "conv1d"]
    assert model["lm"].head.weight is model["lm"].embed.weight


def test_excluded_layers_are_reported_without_a_warning(recwarn):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    _, report = overparameterize(model, exclude=("1",), return_report=True)
    assert report.skipped == [("1.0", "Linear", "excluded"), ("1.2", "Linear", "excluded")]
    assert not [w for w in recwarn if "overparameterize" in str(w.message)]


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")
def test_parametrizations_are_kept_not_dropped():
    torch.manual_seed(25)
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(5, 6)), nn.ReLU(),
        torch.nn.utils.weight_norm(nn.Linear(6, 6)), nn.ReLU(), nn.Linear(6, 3),
    ).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"0 \(ParametrizedLinear\): parametrized weight.*2 \(Linear\): weight computed by a hook"):
        _, report = overparameterize(model, preserve=True, return_report=True)
    assert [name for name, _ in report.replaced] == ["4"]
    assert nn.utils.parametrize.is_parametrized(model[0]) and hasattr(model[2], "weight_g")
    assert_close(model(x), expected, torch.float64, 6)


def test_lazy_layer_is_named_and_replaced_once_initialized():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"0 \(LazyLinear\): uninitialized lazy layer"):
        overparameterize(model)
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.randn(3, 7))
    overparameterize(model)
    assert isinstance(model[0], OverparamLinear) and model[0].in_features == 7


def test_errors_name_the_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"overparameterize: layer '2' \(Linear\): width=0.2 gives hidden size int\(3 \* 0.2\) = 0"):
        overparameterize(model, width=0.2)
    with pytest.raises(ValueError, match=r"init must be one of \('paper', 'match'\), got 'xavier'"):
        overparameterize(model, init="xavier")


def test_exclude_takes_one_name_or_type_and_include_one_type():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 2))
    overparameterize(model, exclude="head", include=nn.Linear)  # a str is one name, not its letters
    assert isinstance(model.body, OverparamLinear) and type(model.head) is nn.Linear
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 2, 1))
    overparameterize(model, exclude=nn.Conv2d)
    assert isinstance(model[0], OverparamLinear) and type(model[1]) is nn.Conv2d
    with pytest.raises(TypeError, match=r"exclude entries must be module names \(str\) or module types, got 3 \(int\)"):
        overparameterize(nn.Linear(2, 2), exclude=(3,))


def test_exclude_and_include_entries_matching_nothing_warn():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"exclude entry 'hed'; include type Conv2d matches no module.*\['0', '1', '2'\]"):
        overparameterize(model, exclude=("hed",), include=(nn.Linear, nn.Conv2d))
    assert type(model[2]) is OverparamLinear  # nothing was excluded
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default include names no layer the user asked for
        overparameterize(nn.Sequential(nn.Linear(4, 4)), exclude=("0",))


def test_numpy_integer_sizes_are_sizes():
    torch.manual_seed(27)
    model = nn.Sequential(nn.Linear(np.int64(8), np.int32(4)), nn.ReLU(), nn.Conv2d(np.int64(1), np.int64(2), np.int64(3)))
    x = torch.randn(3, 8, dtype=torch.float64)
    model = model.double()
    expected = model[0](x)
    overparameterize(model, preserve=True)
    assert isinstance(model[0], OverparamLinear) and type(model[0].in_features) is int
    assert_close(model[0](x), expected, torch.float64, 8)
    conv = OverparamConv2d(np.int64(3), np.int64(4), kernel_sizes=(np.int64(3), 1), stride=np.int64(2), groups=np.int64(1))
    assert conv.kernel_size == (3, 3) and conv.stride == (2, 2) and type(conv.in_channels) is int


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("option", [dict(preserve=True), dict(init="match")], ids=["preserve", "match"])
def test_non_finite_weights_are_named_not_factored(option, value):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight[1, 2] = value
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\): its weight is not finite \(\d NaN and \d Inf of 12 elements\)"):
        overparameterize(model, **option)
    assert type(model[0]) is nn.Linear  # nothing replaced when one layer fails


@pytest.mark.parametrize(
    "make",
    [
        lambda: OverparamLinear(4, 4, width=float("inf")),
        lambda: OverparamLinear(4, 4, width=float("nan")),
        lambda: OverparamConv2d(2, 2, width=float("inf")),
    ],
    ids=["linear-inf", "linear-nan", "conv-inf"],
)
def test_non_finite_width_is_refused(make):
    with pytest.raises(ValueError, match=r"width must be a finite number > 0, got (inf|nan)"):
        make()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.bool], ids=str)
def test_non_floating_dtypes_are_refused_at_construction(dtype):
    for make in (lambda: OverparamLinear(4, 4, dtype=dtype), lambda: OverparamConv2d(2, 2, dtype=dtype)):
        with pytest.raises(TypeError, match=rf"dtype must be a floating-point torch.dtype .*got {dtype}"):
            make()


# ---- preserve: the balanced factorization ---------------------------------------------------------


FACTOR_CASES = [((7, 129), 2, 1.0), ((129, 7), 3, 1.0), ((64, 64), 4, 2.0), ((1, 5), 2, 3.0), ((33, 300), 3, 1.0)]


@pytest.mark.parametrize("compute", ["fp64", "fp32"])
@pytest.mark.parametrize("shape,depth,width", FACTOR_CASES, ids=str)
def test_balanced_factors_product_and_balance(monkeypatch, compute, shape, depth, width):
    if compute == "fp32":
        monkeypatch.setattr(layers_preserve, "_FP64_FACTOR_BUDGET", 0)
    torch.manual_seed(26)
    out_f, in_f = shape
    weight = torch.randn(out_f, in_f, dtype=torch.float64).float()
    dims = [in_f] + [int(out_f * width)] * (depth - 1) + [out_f]
    factors = layers_preserve._balanced_factors(weight, dims, "'w'")
    assert factors[0].dtype == (torch.float64 if compute == "fp64" else torch.float32)
    assert [tuple(f.shape) for f in factors] == [(dims[j + 1], dims[j]) for j in range(depth)]
    product = fastrank.collapsed_weight([f.double() for f in factors])
    dtype = torch.float64 if compute == "fp64" else torch.float32
    assert_close(product, weight.double(), dtype, max(shape), steps=depth, what="product")


@pytest.mark.parametrize("compute", ["fp64", "fp32"])
@pytest.mark.parametrize("shape,depth,width", FACTOR_CASES, ids=str)
def test_balanced_factors_are_balanced(monkeypatch, compute, shape, depth, width):
    # W_{j+1}^T W_{j+1} = W_j W_j^T. Through the Gram, singular value s_i carries a relative error
    # of eps (s_max / s_i)^2, so the fp32 case takes a weight with singular values in [1, 2]
    # (condition 2: the tolerance of 4 times as many steps).
    if compute == "fp32":
        monkeypatch.setattr(layers_preserve, "_FP64_FACTOR_BUDGET", 0)
    torch.manual_seed(30)
    out_f, in_f = shape
    k = min(shape)
    u = torch.linalg.qr(torch.randn(out_f, k, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_f, k, dtype=torch.float64))[0]
    weight = ((u * torch.linspace(1, 2, k, dtype=torch.float64)) @ v.T).float()
    dims = [in_f] + [int(out_f * width)] * (depth - 1) + [out_f]
    factors = [f.double() for f in layers_preserve._balanced_factors(weight, dims, "'w'")]
    dtype, steps = (torch.float64, depth) if compute == "fp64" else (torch.float32, 4 * depth)
    for j in range(depth - 1):
        left = factors[j + 1].T @ factors[j + 1]
        right = factors[j] @ factors[j].T
        assert_close(left, right, dtype, max(shape), steps=steps, what=f"balance {j}")


@pytest.mark.parametrize("compute", ["fp64", "fp32"])
def test_balanced_factors_of_a_low_rank_weight(monkeypatch, compute):
    if compute == "fp32":
        monkeypatch.setattr(layers_preserve, "_FP64_FACTOR_BUDGET", 0)
    torch.manual_seed(27)
    weight = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 57, dtype=torch.float64)
    factors = layers_preserve._balanced_factors(weight.float(), [57, 40, 40, 40], "'w'")
    assert all(f.isfinite().all() for f in factors)
    product = fastrank.collapsed_weight([f.double() for f in factors])
    dtype = torch.float64 if compute == "fp64" else torch.float32
    assert_close(product, weight.float().double(), dtype, 57, steps=3, what="product")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_preserve_each_dtype(dtype):
    torch.manual_seed(28)
    model = ResidualConvNet().to(dtype)
    _randomize_batch_norms(model)
    model.eval()
    x = torch.randn(2, 3, 9, 7).to(dtype)
    reference = copy.deepcopy(model).double()
    overparameterize(model, depth=2, preserve=True)
    # The factors are exact to the compute dtype, then rounded to the layer's: one rounding per
    # factor and per product on top of the plain model's own rounding.
    assert_close(model(x), reference(x.double()), dtype, 63, steps=6, what="preserved")


def test_progress_bar_on_request(capsys):
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    overparameterize(model, preserve=True, progress=True)
    assert "overparameterize" in capsys.readouterr().err
    overparameterize(nn.Sequential(nn.Linear(6, 6)), preserve=True)
    assert capsys.readouterr().err == ""


# ---- init="match" -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: nn.Linear(37, 29), lambda: nn.Conv2d(6, 12, 3, groups=2)],
                         ids=["linear", "conv-groups"])
@pytest.mark.parametrize("depth", [2, 4])
def test_init_match_scales_collapsed_weight_to_the_original(make, depth):
    torch.manual_seed(29)
    layer = make().double()
    with torch.no_grad():
        layer.weight.mul_(0.3)
        layer.bias.uniform_(-1, 1)
    target = layer.weight.square().mean()
    replacement = overparameterize(copy.deepcopy(layer), depth=depth, width=1.5, init="match")
    paper = overparameterize(copy.deepcopy(layer), depth=depth, width=1.5)
    collapsed = replacement.collapsed_parameters()[0].detach()
    assert_close(collapsed.square().mean().reshape(1), target.reshape(1), torch.float64, collapsed.numel(),
                 steps=depth, what="mean square")
    assert torch.equal(replacement.bias, layer.bias)
    # The paper's init has another scale (what init="match" is for).
    assert abs(paper.collapsed_parameters()[0].square().mean() / target - 1) > 0.5


def test_init_match_of_a_zero_weight_keeps_gradients():
    layer = nn.Linear(5, 4)
    with torch.no_grad():
        layer.weight.zero_()
    replacement = overparameterize(layer, depth=3, init="match")
    assert torch.count_nonzero(replacement.collapsed_parameters()[0]) == 0
    replacement(torch.randn(3, 5)).square().sum().backward()
    assert replacement.factors[-1].grad.abs().max() > 0


def test_path_choices_are_bounded_and_pickles_from_before_load():
    layer = OverparamLinear(4, 4, depth=2)
    with torch.no_grad():
        for rows in range(1, layers_base._PATH_CHOICES_KEPT + 20):
            layer(torch.randn(rows, 4))
    assert 0 < len(layer._path_choices) <= layers_base._PATH_CHOICES_KEPT
    state = layer.__getstate__()
    del state["_path_choices"]  # a layer pickled before the choices were remembered
    restored = OverparamLinear.__new__(OverparamLinear)
    restored.__setstate__(state)
    x = torch.randn(3, 4)
    assert torch.equal(restored(x), layer(x))


def test_residual_layers_save_their_interval_and_load_checkpoints_made_without_it():
    torch.manual_seed(60)
    layer = OverparamLinear(5, 5, depth=4, residual=True)
    state = layer.state_dict()
    assert int(state["residual_interval"]) == layers_linear.RESIDUAL_INTERVAL
    older = {k: v for k, v in state.items() if k != "residual_interval"}  # saved before the buffer existed
    fresh = OverparamLinear(5, 5, depth=4, residual=True)
    assert fresh.load_state_dict(older).missing_keys == []
    x = torch.randn(3, 5)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(RuntimeError, match="residual_interval"):  # a residual checkpoint into a plain chain
        OverparamLinear(5, 5, depth=4).load_state_dict(state)


# ---- torch.nn.utils.parametrize ------------------------------------------------------------


def _chain_of_factors(factors, bias, x):
    """The naive chain of ``factors`` (input side first), then ``bias``."""
    for factor in factors:
        x = F.linear(x, factor)
    return x + bias


class _Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).T


class _Halved(nn.Module):
    def forward(self, b):
        return 0.5 * b


class _Doubled(nn.Module):
    def forward(self, X):
        return 2 * X


_PARAMETRIZATIONS = {
    "orthogonal factor": lambda layer: nn.utils.parametrizations.orthogonal(layer.factors, "1"),
    "spectral-norm factor": lambda layer: nn.utils.parametrizations.spectral_norm(layer.factors, "1"),
    "symmetric factor": lambda layer: nn.utils.parametrize.register_parametrization(layer.factors, "1", _Symmetric()),
    "halved bias": lambda layer: nn.utils.parametrize.register_parametrization(layer, "bias", _Halved()),
}


def _chain_of(layer, x):
    """The naive chain of the layer's factors and bias as its attributes read them (a parametrized
    one computed from its original), differentiable."""
    return _chain_of_factors(list(layer.factors), layer.bias, x)


@pytest.mark.parametrize("name", list(_PARAMETRIZATIONS))
def test_parametrized_factors_and_bias_are_the_ones_the_layer_uses(name):
    """A parametrization moves its tensor out of the module's parameter dict (into
    ``parametrizations.<name>.original``) and computes it at each read: the layer must use the
    computed tensor, in training and from its eval cache, and refresh the cache after a step on the
    original (before, a parametrized factor was silently left out of the chain)."""
    torch.manual_seed(0)
    layer = OverparamLinear(6, 6, depth=3, dtype=torch.float64)
    _PARAMETRIZATIONS[name](layer)
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    # spectral_norm advances its power iteration at every read in training mode: the layer and the
    # reference read the factor once between them, in parametrize's cached mode
    reads = nn.utils.parametrize.cached if name.startswith("spectral") else contextlib.nullcontext
    for step in range(3):
        layer.train()
        with reads():
            out = layer(x)
            want = _chain_of(layer, x)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"train, step {step}: {m}")
        params = list(layer.parameters())
        got = torch.autograd.grad(out.square().sum(), params, retain_graph=True)  # cached: one graph
        expected = torch.autograd.grad(want.square().sum(), params)
        for j, (g, e) in enumerate(zip(got, expected)):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"gradient {j}, step {step}: {m}")
        layer.eval()
        with torch.no_grad():
            for _ in range(2):  # the second call from the cache
                torch.testing.assert_close(layer(x), _chain_of(layer, x), rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"eval, step {step}: {m}")
            # a step within the eval window, on the parametrization's original (an optimizer step)
            optimizer.zero_grad()
        layer.train()
        _chain_of(layer, x).square().sum().backward()
        layer.eval()
        optimizer.step()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), _chain_of(layer, x), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"eval after a step, step {step}: {m}")


def test_parametrized_residual_and_conv_layers_use_their_computed_factors():
    torch.manual_seed(0)
    residual = OverparamLinear(6, 6, depth=3, residual=True, dtype=torch.float64)
    conv = fastrank.OverparamConv2d(3, 3, kernel_sizes=(3, 1, 1), padding=1, dtype=torch.float64)
    cases = [(residual, torch.randn(5, 6, dtype=torch.float64)), (conv, torch.randn(2, 3, 5, 5, dtype=torch.float64))]
    for layer, x in cases:
        plain = copy.deepcopy(layer)
        nn.utils.parametrizations.orthogonal(layer.factors, "1") if layer is residual else \
            nn.utils.parametrize.register_parametrization(layer.factors, "1", _Halved())
        with torch.no_grad():
            for j, factor in enumerate(layer.factors):
                plain.factors[j].copy_(factor)
        for mode in ("train", "eval"):
            layer.train(mode == "train")
            plain.train(mode == "train")
            with torch.no_grad():
                torch.testing.assert_close(layer(x), plain(x), rtol=1e-12, atol=1e-12, msg=lambda m: f"{type(layer).__name__} {mode}: {m}")


class _Counted(nn.Module):
    """An identity parametrization that counts its evaluations."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, X):
        self.calls += 1
        return X * 1.0


def test_choosing_a_path_reads_no_parametrized_factor():
    """A parametrized factor is computed at each read. The cost model reads the layer's widths, not
    its factors, so a training call of a plain chain computes the parametrization once, as
    ``nn.Linear`` does its weight's, at a batch size met for the first time too (twice before)."""
    layer = OverparamLinear(6, 5, depth=3, dtype=torch.float64)
    counted = _Counted()
    nn.utils.parametrize.register_parametrization(layer.factors, "1", counted)
    for batch in (5, 5, 4000, 7):
        counted.calls = 0
        layer(torch.randn(batch, 6, dtype=torch.float64)).sum().backward()
        assert counted.calls == 1, f"batch {batch}: {counted.calls} evaluations"


_COUNTED_LAYERS = {
    "plain": lambda: OverparamLinear(6, 5, depth=3, dtype=torch.float64),
    "residual": lambda: OverparamLinear(6, 6, depth=3, residual=True, dtype=torch.float64),
    "batch-norm": lambda: OverparamLinear(6, 5, depth=3, batch_norm=True, dtype=torch.float64),
    "conv2d": lambda: fastrank.OverparamConv2d(3, 4, kernel_sizes=(3, 1, 1), padding=1, dtype=torch.float64),
    # a bottleneck: the chain of convs is the cheaper path
    "conv2d-chain": lambda: fastrank.OverparamConv2d(8, 8, kernel_sizes=(3, 3), width=0.25, padding=2, dtype=torch.float64),
    "conv1d": lambda: fastrank.OverparamConv1d(3, 4, kernel_sizes=(3, 1), dtype=torch.float64),
}
_COUNTED_INPUTS = {"conv2d": [(2, 3, 7, 7), (9, 3, 7, 7)], "conv2d-chain": [(2, 8, 9, 9)],
                   "conv1d": [(2, 3, 9), (9, 3, 9)]}


@pytest.mark.parametrize("target", ["factor", "bias"])
@pytest.mark.parametrize("kind", list(_COUNTED_LAYERS))
def test_a_parametrization_is_computed_once_per_call(kind, target):
    """Each read of a parametrized tensor computes it anew (``orthogonal``: a matrix exponential;
    ``spectral_norm`` also advances its power iteration at each read in training mode), and the
    layers' general paths read the factors up to six times a call: a call reads them once, so it
    computes each parametrization once, as ``nn.Linear`` does its weight's, in every mode and at
    batch sizes either side of the cost model's threshold; the ``weight`` property too. The reads
    live for the call (a later read computes anew). The one exception: an eval call with frozen
    parameters that needs the input's gradient reads once in the plain path, which declines it,
    and once in the general path."""
    torch.manual_seed(0)
    layer = _COUNTED_LAYERS[kind]()
    counted = _Counted()
    if target == "factor":
        nn.utils.parametrize.register_parametrization(layer.factors, "1", counted)
    else:
        nn.utils.parametrize.register_parametrization(layer, "bias", counted)
    shapes = _COUNTED_INPUTS.get(kind, [(5, 6), (4000, 6)])
    for mode, grad in [("train", True), ("eval", True), ("eval", False), ("train", False)]:
        layer.train(mode == "train")
        for shape in shapes:
            for call in range(2):  # the second with the path remembered (and eval's cache filled)
                x = torch.randn(*shape, dtype=torch.float64)
                counted.calls = 0
                with torch.set_grad_enabled(grad):
                    out = layer(x)
                assert counted.calls == 1, f"{mode}, grad {grad}, input {shape}, call {call}: {counted.calls} evaluations"
                if grad:
                    out.square().sum().backward()
                    assert counted.calls == 1, "the backward evaluated the parametrization again"
    counted.calls = 0
    layer.weight
    assert counted.calls == 1, f"weight: {counted.calls} evaluations"
    counted.calls = 0
    getattr(layer.factors, "1") if target == "factor" else layer.bias
    assert counted.calls == 1, "the reads outlived the call"


def test_a_calls_reads_are_its_threads_own():
    """The reads of a call under way on one thread never serve another thread's call, as
    ``torch.nn.utils.parametrize.cached()`` would (one process-wide cache): a layer trains on the
    main thread while another thread is inside another layer's call, blocked in its parametrization;
    each step uses the factor after the last optimizer step."""
    import threading

    class Blocking(nn.Module):
        def __init__(self):
            super().__init__()
            self.armed = False  # not while registered (register_parametrization evaluates it once)
            self.inside, self.release = threading.Event(), threading.Event()

        def forward(self, X):
            if self.armed:
                self.inside.set()
                self.release.wait(timeout=60)
            return X

    torch.manual_seed(0)
    other = OverparamLinear(4, 4, depth=2, dtype=torch.float64)
    blocking = Blocking()
    nn.utils.parametrize.register_parametrization(other.factors, "0", blocking)
    blocking.armed = True
    layer = OverparamLinear(6, 5, depth=3, residual=False, dtype=torch.float64)
    nn.utils.parametrize.register_parametrization(layer.factors, "1", _Doubled())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    original = layer.factors.parametrizations["1"].original
    x = torch.randn(16, 6, dtype=torch.float64)
    thread = threading.Thread(target=lambda: other.weight)
    thread.start()
    try:
        assert blocking.inside.wait(timeout=60)
        for step in range(3):
            layer.train(step < 2)
            out = layer(x)
            with torch.no_grad():
                want = F.linear(x, layer.factors[2] @ (2 * original) @ layer.factors[0], layer.bias)
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"step {step}: {m}")
            optimizer.zero_grad()
            out.square().sum().backward()
            optimizer.step()
    finally:
        blocking.release.set()
        thread.join()


def test_a_layers_reads_are_its_calls_own_on_each_thread():
    """Two threads in one layer at once: the reads of the call under way on one thread (blocked in
    the bias's parametrization, after it read the factors) never serve the other's call, which
    reads the factors as they are after an in-place update."""
    import threading

    layer = OverparamLinear(6, 5, depth=3, dtype=torch.float64)
    first = threading.Event()
    inside, release = threading.Event(), threading.Event()

    class BlockingOnFirst(nn.Module):
        def forward(self, b):
            if first.is_set() and threading.current_thread() is not threading.main_thread():
                inside.set()
                release.wait(timeout=60)
            return b

    nn.utils.parametrize.register_parametrization(layer.factors, "1", _Doubled())
    nn.utils.parametrize.register_parametrization(layer, "bias", BlockingOnFirst())
    first.set()
    original = layer.factors.parametrizations["1"].original
    x = torch.randn(16, 6, dtype=torch.float64)
    def call_without_grad():  # the general path, which reads once per call
        with torch.no_grad():
            layer(x)

    thread = threading.Thread(target=call_without_grad)
    thread.start()
    try:
        assert inside.wait(timeout=60)
        with torch.no_grad():
            original.mul_(3)
        out = layer(x)
        with torch.no_grad():
            want = F.linear(x, layer.factors[2] @ (2 * original) @ layer.factors[0], layer.bias)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    finally:
        release.set()
        thread.join()


# ---- torch.nn.utils.prune ------------------------------------------------------------------


@pytest.mark.parametrize("remove", [False, True], ids=["pruned", "made-permanent"])
def test_pruned_factors_are_their_masked_originals(remove):
    """torch.nn.utils.prune on a factor moves it to ``<i>_orig`` (last in the list's dict) and sets
    the factor to original x mask in a forward pre-hook of the ParameterList, which nothing calls:
    the layers run that hook, so each forward uses the current original under the mask, and the
    gradient reaches the original through it. ``prune.remove`` then re-inserts the factor last in
    the dict: the layers read the factors by index, not in the dict's order (before, both read the
    unmasked original, or the factors out of order, silently)."""
    import torch.nn.utils.prune as prune
    torch.manual_seed(0)
    layer = OverparamLinear(6, 6, depth=3, dtype=torch.float64)
    prune.l1_unstructured(layer.factors, name="1", amount=0.5)
    prune.random_unstructured(layer.factors, name="1", amount=0.25)  # iterative: a pruning container
    if remove:
        prune.remove(layer.factors, "1")
        assert list(layer.factors._parameters) == ["0", "2", "1"]
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)

    def naive():
        mask = getattr(layer.factors, "1_mask", None)
        middle = layer.factors._parameters["1" if remove else "1_orig"]
        factors = [layer.factors._parameters["0"], middle if mask is None else middle * mask, layer.factors._parameters["2"]]
        return _chain_of_factors(factors, layer.bias, x)

    for step in range(3):
        layer.train()
        out, want = layer(x), naive()
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"train, step {step}: {m}")
        params = list(layer.parameters())
        got = torch.autograd.grad(out.square().sum(), params)
        expected = torch.autograd.grad(want.square().sum(), params)
        for j, (g, e) in enumerate(zip(got, expected)):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"gradient {j}, step {step}: {m}")
        layer.eval()
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(layer(x), naive(), rtol=1e-12, atol=1e-12, msg=lambda m: f"eval, step {step}: {m}")
        for p, g in zip(params, got):
            p.grad = g
        optimizer.step()
