"""``torch.func`` on the layers: model ensembling (``stack_module_state`` + ``functional_call`` under
``vmap``, PyTorch's own recipe), ``grad`` of a functional call, ``vmap`` over inputs, ``jvp`` and
``jacrev``, in train and eval mode, against the same computation without the transform. Under a
transform the tensors are wrappers without storage: the eval cache must neither keep nor read them,
and fp16 / bf16 chains, whose eager steps take the chain's autograd Function (and on CUDA the
Triton kernels), must run as plain torch ops, which the transforms batch and differentiate."""

import copy

import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap

import fastrank

_MAKERS = {
    "linear": lambda dtype: fastrank.OverparamLinear(6, 5, depth=3, dtype=dtype),
    "linear wide": lambda dtype: fastrank.OverparamLinear(6, 5, depth=2, width=4, bias=False, dtype=dtype),
    "linear residual": lambda dtype: fastrank.OverparamLinear(6, 6, depth=4, residual=True, dtype=dtype),
    "conv2d": lambda dtype: fastrank.OverparamConv2d(2, 3, kernel_sizes=(3, 1), padding=1, dtype=dtype),
    "conv1d": lambda dtype: fastrank.OverparamConv1d(2, 3, kernel_sizes=(3, 1), padding=1, dtype=dtype),
    "gpt-2 conv1d": lambda dtype: fastrank.OverparamConv1D(5, 6, depth=3, dtype=dtype),
}
_SHAPES = {"conv2d": (4, 2, 5, 6), "conv1d": (4, 2, 7), "gpt-2 conv1d": (4, 3, 6)}
# fp64: the transforms run the same ops in another order at most; fp32 / bf16: torch's own
# tolerance for the dtype (bf16: the plain ops against the chain's, each rounding a step once)
_TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-13}, torch.float32: {}, torch.bfloat16: {}}
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _models(name: str, dtype: torch.dtype, mode: str, count: int = 3, device: str = "cpu"):
    torch.manual_seed(0)
    models = [_MAKERS[name](dtype).to(device) for _ in range(count)]
    for model in models:
        model.train(mode == "train")
    return models


def _input(name: str, dtype: torch.dtype, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    x = torch.randn(*_SHAPES.get(name, (4, 6)), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.to(device, dtype)


_CASES = [(name, torch.float64, "cpu") for name in _MAKERS] + [
    ("linear", torch.float32, "cpu"),
    ("linear", torch.bfloat16, "cpu"),
    ("linear residual", torch.bfloat16, "cpu"),
    pytest.param("linear", torch.bfloat16, "cuda", marks=_CUDA),
    pytest.param("linear residual", torch.bfloat16, "cuda", marks=_CUDA),
    pytest.param("linear", torch.float32, "cuda", marks=_CUDA),
]
_IDS = [f"{name}-{str(dtype)[6:]}-{device}" for name, dtype, device in
        (case.values if hasattr(case, "values") else case for case in _CASES)]


def _assert_as_close(got: torch.Tensor, plain: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """``got`` (under a transform) as close as ``plain`` (the same call without it): equal to
    rounding in fp64 / fp32; in bf16, where the two run different roundings (plain ops against the
    chain's), no further from the fp64 ``reference`` than twice ``plain``'s error (or one bf16 step
    of its largest entry, where ``plain`` is exact)."""
    if got.dtype != torch.bfloat16:
        torch.testing.assert_close(got, plain, **_TOLERANCE[got.dtype], msg=lambda m: f"{what}: {m}")
        return
    assert got.shape == plain.shape == reference.shape, what
    error, plain_error = ((t.double() - reference).abs().max().item() for t in (got, plain))
    allowed = 2 * max(plain_error, 2.0**-8 * reference.abs().max().item())
    assert error <= allowed, f"{what}: error {error:.3g} against the fp64 reference, allowed {allowed:.3g} (plain: {plain_error:.3g})"


def _fp64(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("name", "dtype", "device"), _CASES, ids=_IDS)
def test_ensemble_under_vmap_equals_each_model(name, dtype, device, mode):
    models = _models(name, dtype, mode, device=device)
    x = _input(name, dtype, device=device)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def one(params, buffers, x):
        return functional_call(base, (params, buffers), (x,))

    for _ in range(2):  # a second call would meet whatever the first left in the cache
        out = vmap(one, in_dims=(0, 0, None))(params, buffers, x)
        for i, model in enumerate(models):
            _assert_as_close(out[i], model(x), _fp64(model)(x.double()), f"model {i}")
    assert base._cache.value is None  # nothing of the transform was kept


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("name", "dtype", "device"), _CASES, ids=_IDS)
def test_grad_of_a_functional_call_equals_autograd(name, dtype, device, mode):
    (model,) = _models(name, dtype, mode, count=1, device=device)
    x = _input(name, dtype, device=device)
    params = {key: value.detach() * 1.25 for key, value in model.named_parameters()}

    def loss(module, params, x):
        return functional_call(module, params, (x,)).square().sum()

    got = grad(lambda params, x: loss(model, params, x))(params, x)
    leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
    plain = torch.autograd.grad(loss(model, leaves, x), list(leaves.values()))
    leaves = {key: value.double().requires_grad_() for key, value in params.items()}
    reference = torch.autograd.grad(loss(_fp64(model), leaves, x.double()), list(leaves.values()))
    for (key, value), want, exact in zip(got.items(), plain, reference):
        _assert_as_close(value, want, exact, key)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("name", "dtype", "device"), _CASES, ids=_IDS)
def test_vmap_jvp_and_jacrev_over_inputs(name, dtype, device, mode):
    (model,) = _models(name, dtype, mode, count=1, device=device)
    exact = _fp64(model)
    x = _input(name, dtype, device=device)
    xs = torch.stack([x, _input(name, dtype, seed=2, device=device)])
    with torch.no_grad():
        batched = vmap(model)(xs)
        for i in range(2):
            _assert_as_close(batched[i], model(xs[i]), exact(xs[i].double()), f"vmap, input {i}")
    jacobian = torch.autograd.functional.jacobian(model, x)
    reference = torch.autograd.functional.jacobian(exact, x.double())
    _assert_as_close(jacrev(model)(x), jacobian, reference, "jacrev")
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device, dtype)
    out, directional = jvp(model, (x,), (tangent,))
    _assert_as_close(out, model(x), exact(x.double()), "jvp output")
    product = (jacobian.double().reshape(out.numel(), x.numel()) @ tangent.double().reshape(-1)).reshape(out.shape)
    exact_product = (reference.reshape(out.numel(), x.numel()) @ tangent.double().reshape(-1)).reshape(out.shape)
    _assert_as_close(directional, product.to(dtype), exact_product, "jvp tangent")
