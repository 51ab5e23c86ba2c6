"""OverparamConv1d against nn.Conv1d, and transformers' Conv1D (GPT-2) as a first-class layer type."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tolerance import assert_close

import fastrank
import fastrank.layers.convolution as layers_conv
from fastrank import OverparamConv1d, OverparamConv1D, collapse, overparameterize


def naive_conv1d(layer, x):
    """The chain of 1-D convolutions: padding once on the input, stride on the last factor."""
    left, right, _, _ = layer._pad
    mode = {"zeros": "constant"}.get(layer.padding_mode, layer.padding_mode)
    h = F.pad(x, (left, right), mode=mode)
    for j, factor in enumerate(layer.factors):
        last = j == layer.depth - 1
        h = F.conv1d(h, factor, layer.bias if last else None, layer.stride if last else 1, 0, layer.dilation, layer.groups)
    return h


CONV1D_CASES = [
    dict(),
    dict(kernel_sizes=(3, 3, 1), padding=1),
    dict(kernel_sizes=(5, 1, 3), stride=2, padding=2, dilation=2, groups=2),
    dict(kernel_sizes=((3,), 1), stride=(3,), padding="valid", groups=4),
    dict(kernel_sizes=(3, 2), padding="same", padding_mode="reflect"),
    dict(kernel_sizes=(3, 3), padding=(1,), padding_mode="circular", dilation=(3,)),
    dict(kernel_sizes=(1, 3), padding=2, padding_mode="replicate", stride=3, width=0.5, groups=2),
    dict(kernel_sizes=7, bias=False),
]


def _force_path(monkeypatch, path):
    costs = (0, 1) if path == "activation" else (1, 0)
    monkeypatch.setattr(layers_conv, "conv_chain_costs", lambda *a, **k: costs)


def _plain_twin(layer):
    ref = nn.Conv1d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                    padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                    bias=layer.bias is not None, padding_mode=layer.padding_mode, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    return ref


@pytest.mark.parametrize("path", ["activation", "collapsed"])
@pytest.mark.parametrize("kwargs", CONV1D_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_conv1d_equals_conv1d_with_collapsed_kernel_and_the_chains_gradients(monkeypatch, path, kwargs):
    _force_path(monkeypatch, path)
    torch.manual_seed(1)
    layer = OverparamConv1d(4, 8, dtype=torch.float64, **kwargs)
    assert layer.weight.shape == (8, 4 // layer.groups, layer.kernel_size[0])
    assert all(f.dim() == 3 for f in layer.factors)
    ref = _plain_twin(layer)
    x = torch.randn(3, 29, 4, dtype=torch.float64).transpose(1, 2)  # non-contiguous (3, 4, 29)
    x.requires_grad_(True)
    out = layer(x)
    expected = ref(x)
    assert out.shape == expected.shape
    assert_close(out, expected, torch.float64, 4 * 9)
    xr = x.detach().clone().requires_grad_(True)
    chain = naive_conv1d(layer, xr)
    assert_close(out, chain, torch.float64, 4 * 9, what="vs naive chain")
    grad_out = torch.randn_like(out)
    params = [*layer.factors] + ([layer.bias] if layer.bias is not None else [])
    ours = torch.autograd.grad(out, [x, *params], grad_out)
    theirs = torch.autograd.grad(chain, [xr, *params], grad_out)
    for j, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, torch.float64, 2 * 29 * 8, what=f"grad {j}")


@pytest.mark.parametrize("length", [1, 7, 130], ids=lambda n: f"L={n}")
def test_conv1d_unbatched_eval_cache_and_odd_lengths(length):
    torch.manual_seed(2)
    layer = OverparamConv1d(3, 5, kernel_sizes=(3, 3), padding=2, dtype=torch.float64)
    ref = _plain_twin(layer)
    x = torch.randn(3, length, dtype=torch.float64)
    assert_close(layer(x), ref(x), torch.float64, 3 * 5)
    layer.eval()
    with torch.no_grad():
        first = layer(x[None])
        assert layer._cache.value is not None and layer._cache.value[0].shape == (5, 3, 5)
        assert torch.equal(layer(x[None]), first)
        layer.factors[0].mul_(2.0)
        assert_close(layer(x[None]), _plain_twin(layer)(x[None]), torch.float64, 3 * 5, what="after an edit")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_sizes=(3, (1, 3))), r"kernel_sizes entries must be positive ints or \(k,\) tuples"),
        (dict(stride=(1, 2)), r"stride must be an int >= 1 or a 1-tuple of one, got \(1, 2\)"),
        (dict(padding="same", stride=2), r"padding='same' needs stride 1"),
        (dict(padding="full"), r"padding must be an int, a 1-tuple, 'valid' or 'same', got 'full'"),
        (dict(groups=3), r"groups=3 must divide in_channels=4"),
    ],
    ids=["kernel-pair", "stride-pair", "same-stride", "padding-str", "groups"],
)
def test_conv1d_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OverparamConv1d(4, 8, **kwargs)


def test_conv1d_bad_input_names_the_layer():
    layer = OverparamConv1d(4, 8)
    with pytest.raises(ValueError, match=r"OverparamConv1d: expected input with in_channels=4 at dim 1, got shape \(2, 5, 9\)"):
        layer(torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match=r"OverparamConv1d: expected input \(N, C, L\) or \(C, L\), got shape \(2, 4, 9, 9\)"):
        layer(torch.randn(2, 4, 9, 9))


def test_overparameterize_conv1d_preserves_and_collapses_back():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv1d(3, 6, 5, stride=2, padding=2, dilation=1, groups=3, padding_mode="reflect"), nn.ReLU(),
        nn.Conv1d(6, 4, 3, padding="same", dilation=2),
    ).double()
    x = torch.randn(2, 3, 31, dtype=torch.float64)
    expected = model(x)
    overparameterize(model, depth=3, preserve=True)
    assert isinstance(model[0], OverparamConv1d) and model[0].kernel_sizes == [(5,), (1,), (1,)]
    assert_close(model(x), expected, torch.float64, 6 * 5)
    collapse(model)
    assert type(model[0]) is nn.Conv1d and model[0].padding_mode == "reflect" and model[2].padding == "same"
    assert_close(model(x), expected, torch.float64, 6 * 5, what="collapsed")


def test_conv1d_state_dict_round_trip_and_pickle():
    torch.manual_seed(4)
    layer = OverparamConv1d(4, 6, kernel_sizes=(3, 1), padding=1)
    other = OverparamConv1d(4, 6, kernel_sizes=(3, 1), padding=1)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 9)
    assert torch.equal(other(x), layer(x))
    copied = copy.deepcopy(layer.eval())
    with torch.no_grad():
        assert torch.equal(copied(x), layer(x))


# ---- transformers' Conv1D ------------------------------------------------------------------------


transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def test_conv1d_of_transformers_is_replaced_preserved_and_collapsed_to_its_layout():
    torch.manual_seed(5)
    model = nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(3, 7)).double()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    expected = model(x)
    _, report = overparameterize(model, depth=3, preserve=True, return_report=True)
    assert [kind for _, kind in report.replaced] == ["Conv1D", "Conv1D"]
    layer = model[0]
    assert isinstance(layer, OverparamConv1D) and (layer.nf, layer.nx) == (7, 5)
    assert layer.weight.shape == (5, 7)  # Conv1D's (nx, nf)
    assert_close(model(x), expected, torch.float64, 8)
    out = model(x)
    out.square().sum().backward()
    assert all(f.grad is not None for f in layer.factors)
    collapse(model)
    assert type(model[0]) is Conv1D and model[0].weight.shape == (5, 7)
    assert_close(model(x), expected, torch.float64, 8, what="collapsed")


def test_conv1d_of_transformers_can_be_excluded_and_its_subclass_is_named():
    class Mine(Conv1D):
        pass

    model = nn.Sequential(Conv1D(4, 4), Mine(4, 4))
    with pytest.warns(UserWarning, match=r"1 \(Mine\): subclass of transformers' Conv1D.*include=\(\.\.\., Mine\)"):
        overparameterize(model)
    assert isinstance(model[0], OverparamConv1D) and type(model[1]) is Mine
    model = nn.Sequential(Conv1D(4, 4))
    overparameterize(model, exclude=Conv1D)
    assert type(model[0]) is Conv1D
    model = nn.Sequential(Conv1D(4, 4), nn.Linear(4, 4))
    overparameterize(model, include=nn.Linear)  # Conv1D left out of include: listed, no warning
    assert type(model[0]) is Conv1D


def _tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=53, n_positions=12, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(6)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_is_overparameterized_with_one_meaningful_warning():
    model = _tiny_gpt2()
    tokens = torch.randint(0, 53, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(tokens).logits
    with pytest.warns(UserWarning) as caught:
        _, report = overparameterize(model, depth=2, preserve=True, return_report=True)
    assert len(report.replaced) == 8, report  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks
    assert [(name, why.split(";")[0]) for name, _, why in report.skipped] == [
        ("lm_head", "weight tied to 'transformer.wte.weight'")
    ]
    messages = [str(w.message) for w in caught if "overparameterize" in str(w.message)]
    assert len(messages) == 1 and "lm_head" in messages[0] and "wte" not in messages[0].split("tied to")[0]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-4, atol=1e-4)


def test_llama_is_overparameterized_without_a_warning():
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)
    model = transformers.LlamaForCausalLM(config)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = overparameterize(model, return_report=True)
    assert report.skipped == [] and len(report.replaced) == 8  # q, k, v, o, gate, up, down, lm_head
