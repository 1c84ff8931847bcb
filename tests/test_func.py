"""torch.func and forward-mode AD on convkit's ops, as on torch's: vmap (batching rules that
fold the vmapped dimension into the batch, the groups or the channels), per-sample gradients
(vmap of grad), jvp, jacfwd and torch.autograd.forward_ad; everything against the same
transform applied to torch.nn.functional, in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacfwd, jvp, vmap

import convkit
from conftest import ACTIVATIONS, DEVICE_PARAMS, TORCH_ACTIVATIONS, fused_batch_norm

D = torch.float64


def _close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


CONV_IN_DIMS = [(0, None, None), (None, 0, None), (None, None, 0), (0, 0, 0), (1, 0, None)]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("in_dims", CONV_IN_DIMS, ids=str)
def test_vmap_conv2d(in_dims, groups, device):
    B = 3
    x = torch.randn(2, 4, 7, 6, dtype=D, device=device)
    w = torch.randn(6, 4 // groups, 3, 2, dtype=D, device=device)
    b = torch.randn(6, dtype=D, device=device)
    args = []
    for t, dim in zip((x, w, b), in_dims):
        if dim is None:
            args.append(t)
        else:
            args.append(torch.stack([torch.randn_like(t) for _ in range(B)], dim=dim))
    kwargs = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=groups)
    ours = vmap(lambda *a: convkit.conv2d(*a, **kwargs), in_dims=in_dims)(*args)
    theirs = vmap(lambda *a: F.conv2d(*a, **kwargs), in_dims=in_dims)(*args)
    _close(ours, theirs)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("activation", ["none", "relu", "hardswish"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("in_dims", [(0, None, None), (0, 0, 0), (None, 0, 0), (2, None, 0)], ids=str)
def test_vmap_batch_norm(in_dims, training, activation, device):
    """Each vmapped slice has its own statistics (training) and its own parameters."""
    B = 3
    x = torch.randn(5, 3, 4, 4, dtype=D, device=device) * 2 + 1
    w = torch.rand(3, dtype=D, device=device) + 0.5
    b = torch.randn(3, dtype=D, device=device)
    rm, rv = torch.randn(3, dtype=D, device=device), torch.rand(3, dtype=D, device=device) + 0.5
    args = [t if d is None else torch.stack([torch.randn_like(t) + 1 for _ in range(B)], dim=d)
            for t, d in zip((x, w, b), in_dims)]
    stats = (None, None) if training else (rm, rv)

    def ours(x, w, b):
        return fused_batch_norm(activation)(x, *stats, w, b, training=training)

    def theirs(x, w, b):
        out = F.batch_norm(x, *stats, w, b, training=training)
        return TORCH_ACTIVATIONS[activation](out)

    _close(vmap(ours, in_dims=in_dims)(*args), vmap(theirs, in_dims=in_dims)(*args))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_vmap_running_statistics(device):
    """Vmapped running statistics: each slice updates its own, in place, as a loop would; a
    shared one under vmapped batch statistics is refused, as torch refuses it."""
    B = 3
    x = torch.randn(B, 6, 3, 4, dtype=D, device=device)
    ours_stats = [torch.zeros(B, 3, dtype=D, device=device), torch.ones(B, 3, dtype=D, device=device)]
    vmap(lambda x, rm, rv: convkit.batch_norm(x, rm, rv, training=True))(x, *ours_stats)
    for i in range(B):
        rm, rv = torch.zeros(3, dtype=D, device=device), torch.ones(3, dtype=D, device=device)
        F.batch_norm(x[i], rm, rv, training=True)
        _close(ours_stats[0][i], rm)
        _close(ours_stats[1][i], rv)
    shared = [torch.zeros(3, dtype=D, device=device), torch.ones(3, dtype=D, device=device)]
    with pytest.raises(RuntimeError, match="the running statistics are shared"):
        vmap(lambda x: convkit.batch_norm(x, *shared, training=True))(x)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_vmap_im2col_col2im(device):
    x = torch.randn(3, 2, 3, 7, 6, dtype=D, device=device)
    args = ((3, 2), (1, 2), (1, 0), (2, 1))
    columns = vmap(lambda t: convkit.functional.im2col(t, *args))(x)
    _close(columns, vmap(lambda t: F.unfold(t, *args))(x))
    _close(vmap(lambda c: convkit.functional.col2im(c, (7, 6), *args))(columns),
           vmap(lambda c: F.fold(c, (7, 6), *args))(columns))


def _small_cnn(make_conv, make_bn) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(make_conv(3, 6, 3, padding=1), make_bn(6), nn.ReLU(),
                         make_conv(6, 4, 3, stride=2), nn.Flatten(), nn.Linear(36, 5)).to(D)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_per_sample_gradients_match_torch(device):
    """vmap(grad(loss)) over the samples of a batch: the per-sample gradients differentially
    private training needs, with batch norm in eval mode."""
    ours = convkit.nn.convert(_small_cnn(nn.Conv2d, nn.BatchNorm2d)).to(device).eval()
    theirs = _small_cnn(nn.Conv2d, nn.BatchNorm2d).to(device).eval()
    with torch.no_grad():
        for m in (ours, theirs):
            m[1].running_mean.uniform_(-1, 1)
            m[1].running_var.uniform_(0.5, 2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 8, 8, dtype=D, device=device)
    y = torch.randint(0, 5, (7,), device=device)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def loss(p, xi, yi):
            out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(out, yi.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, expected = per_sample(ours), per_sample(theirs)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].shape[0] == 7
        _close(got[name], expected[name])


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_jvp_conv2d(with_bias, device):
    x = torch.randn(2, 4, 6, 7, dtype=D, device=device)
    w = torch.randn(6, 2, 3, 3, dtype=D, device=device)
    b = torch.randn(6, dtype=D, device=device) if with_bias else None
    primals = (x, w) + ((b,) if with_bias else ())
    tangents = tuple(torch.randn_like(t) for t in primals)
    kwargs = dict(padding=1, groups=2)
    ours = jvp(lambda *a: convkit.conv2d(*a, **kwargs), primals, tangents)
    theirs = jvp(lambda *a: F.conv2d(*a, **kwargs), primals, tangents)
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["all", "input", "weight", "bias"])
def test_jvp_batch_norm(which, training, activation, device):
    x = torch.randn(6, 3, 4, 5, dtype=D, device=device) * 2 + 1
    w = torch.rand(3, dtype=D, device=device) + 0.5
    b = torch.randn(3, dtype=D, device=device)
    rm, rv = torch.randn(3, dtype=D, device=device), torch.rand(3, dtype=D, device=device) + 0.5
    tangents = tuple(torch.randn_like(t) if which in ("all", name) else torch.zeros_like(t)
                     for t, name in ((x, "input"), (w, "weight"), (b, "bias")))

    def ours(x, w, b):
        return fused_batch_norm(activation)(x, rm.clone(), rv.clone(), w, b, training=training)

    def theirs(x, w, b):
        out = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)
        return TORCH_ACTIVATIONS[activation](out)

    got, expected = jvp(ours, (x, w, b), tangents), jvp(theirs, (x, w, b), tangents)
    _close(got[0], expected[0])
    _close(got[1], expected[1])


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_jacfwd_conv2d(device):
    x = torch.randn(1, 2, 4, 4, dtype=D, device=device)
    w = torch.randn(3, 2, 2, 2, dtype=D, device=device)
    _close(jacfwd(lambda t: convkit.conv2d(t, w))(x), jacfwd(lambda t: F.conv2d(t, w))(x))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_forward_ad_dual_tensors_through_modules(device):
    import torch.autograd.forward_ad as fwAD

    ours = convkit.nn.convert(_small_cnn(nn.Conv2d, nn.BatchNorm2d)).to(device).train()
    theirs = _small_cnn(nn.Conv2d, nn.BatchNorm2d).to(device).train()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 8, 8, dtype=D, device=device)
    tangent = torch.randn_like(x)
    results = []
    for model in (ours, theirs):
        with fwAD.dual_level():
            out = model(fwAD.make_dual(x, tangent))
            results.append([t.clone() for t in fwAD.unpack_dual(out)])
    _close(results[0][0], results[1][0])
    _close(results[0][1], results[1][1])
