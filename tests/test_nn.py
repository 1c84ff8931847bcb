"""Modules: same parameters, buffers, init, state_dict keys and repr as torch's; weights
load both ways; padding modes; convert() on a small CNN and a ResNet-style network gives
the same outputs and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convkit
from convkit.nn import BatchNorm2d, BatchNormReLU2d, Conv2d, convert
from conftest import DEVICE_PARAMS

CONV_KWARGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=4, padding="same", groups=4),
    dict(in_channels=2, out_channels=3, kernel_size=2, padding="valid"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=2, padding_mode="reflect"),
    dict(in_channels=3, out_channels=5, kernel_size=(3, 2), padding=(1, 2), padding_mode="replicate"),
    dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1, padding_mode="circular"),
]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("kwargs", CONV_KWARGS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_conv2d_module_matches_torch(kwargs, device):
    theirs = nn.Conv2d(**kwargs).double().to(device)
    ours = Conv2d(**kwargs).double().to(device)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, kwargs["in_channels"], 9, 8, dtype=torch.float64, device=device)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y_ours)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-10, atol=1e-10)
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=1e-10, atol=1e-10)
    # And back: torch's module loads ours.
    theirs_again = nn.Conv2d(**kwargs).double().to(device)
    theirs_again.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs_again(x), y_theirs.detach(), rtol=1e-10, atol=1e-10)


def test_conv2d_module_init_matches_torch():
    """Same initialisation: with the same seed, the same weights as torch.nn.Conv2d."""
    torch.manual_seed(0)
    theirs = nn.Conv2d(3, 8, 5, stride=2, padding=2)
    torch.manual_seed(0)
    ours = Conv2d(3, 8, 5, stride=2, padding=2)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    assert isinstance(ours, nn.Conv2d)


@pytest.mark.parametrize("cls", [BatchNorm2d, BatchNormReLU2d])
@pytest.mark.parametrize("kwargs", [dict(), dict(affine=False), dict(momentum=None), dict(track_running_stats=False, eps=1e-3)])
def test_batch_norm_module_state_dict_and_repr(cls, kwargs):
    theirs = nn.BatchNorm2d(7, **kwargs)
    ours = cls(7, **kwargs)
    assert repr(ours) == repr(theirs).replace("BatchNorm2d", cls.__name__)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    for (name, t_ours), t_theirs in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(t_ours, t_theirs), name
    # Weights (and running stats) load both ways.
    theirs.train()(torch.randn(4, 7, 3, 3))
    ours.load_state_dict(theirs.state_dict())
    back = nn.BatchNorm2d(7, **kwargs)
    back.load_state_dict(ours.state_dict())
    for t_back, t_theirs in zip(back.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(t_back, t_theirs)


def _small_cnn() -> nn.Module:
    """The chapter's CNN shape: conv, batch norm, ReLU in Sequentials."""
    def conv(ni, nf, ks=3, act=True):
        layers = [nn.Conv2d(ni, nf, ks, stride=2, padding=ks // 2), nn.BatchNorm2d(nf)]
        if act:
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)
    return nn.Sequential(conv(1, 8, ks=5), conv(8, 16), conv(16, 32), conv(32, 10, act=False), nn.Flatten())


class _BasicBlock(nn.Module):
    """A ResNet basic block as torchvision writes it: BN and ReLU called from forward."""

    def __init__(self, ni, nf, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(ni, nf, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(nf)
        self.downsample = None
        if stride != 1 or ni != nf:
            self.downsample = nn.Sequential(nn.Conv2d(ni, nf, 1, stride, bias=False), nn.BatchNorm2d(nf))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _small_resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        _BasicBlock(8, 8), _BasicBlock(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("make_model, input_shape", [(_small_cnn, (6, 1, 28, 28)), (_small_resnet, (4, 3, 32, 32))])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_gives_same_outputs_and_gradients(make_model, input_shape, mode, device):
    original = make_model().double().to(device)
    # Non-trivial running statistics and affine parameters.
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1); m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.5, 0.5)
    original.train(mode == "train")
    converted = convert(original)
    assert converted is not original
    assert list(converted.state_dict().keys()) == list(original.state_dict().keys())
    assert converted.training == original.training
    assert all(m.training == original.training for m in converted.modules())
    kinds = {type(m) for m in converted.modules()}
    assert nn.Conv2d not in kinds and nn.BatchNorm2d not in kinds
    assert Conv2d in kinds
    for p in converted.parameters():
        assert p.dtype == torch.float64 and p.device.type == device

    x = torch.randn(input_shape, dtype=torch.float64, device=device)
    y_original = original(x)
    y_converted = converted(x)
    torch.testing.assert_close(y_converted, y_original, rtol=1e-9, atol=1e-9)
    y_original.square().sum().backward()
    y_converted.square().sum().backward()
    for (name, p_o), p_c in zip(original.named_parameters(), converted.parameters()):
        torch.testing.assert_close(p_c.grad, p_o.grad, rtol=1e-8, atol=1e-8, msg=name)
    for (name, b_o), b_c in zip(original.named_buffers(), converted.buffers()):
        torch.testing.assert_close(b_c, b_o, rtol=1e-10, atol=1e-10, msg=name)


def test_convert_fuses_batch_norm_and_relu_in_sequential():
    model = convert(_small_cnn())
    # conv(1,8..) .. conv(16,32): BN+ReLU fused; the last block (act=False) stays a BatchNorm2d.
    for block in list(model)[:3]:
        assert type(block[1]) is BatchNormReLU2d
        assert type(block[2]) is nn.Identity
    assert type(model[3][1]) is BatchNorm2d
    # BN and ReLU called from forward are fused through torch.fx (tests/test_conversion.py);
    # the block's second ReLU, after the addition, stays.
    resnet = convert(_small_resnet())
    assert type(resnet[1]) is BatchNormReLU2d and type(resnet[2]) is nn.Identity
    assert type(resnet[4].bn1) is BatchNormReLU2d and type(resnet[4].relu) is nn.ReLU
    assert type(resnet[4].bn2) is BatchNorm2d


def test_convert_inplace_and_leaves_subclasses_alone():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(1, 2, 3), MyConv(2, 2, 3))
    same = convert(model, inplace=True)
    assert same is model
    assert type(model[0]) is Conv2d and type(model[1]) is MyConv
    assert type(convert(nn.Conv2d(1, 2, 3))) is Conv2d
    with pytest.raises(TypeError, match="expected an nn.Module"):
        convert("not a model")


def test_converted_model_state_dict_loads_into_torch_model():
    original = _small_cnn()
    converted = convert(original)
    converted.train()(torch.randn(4, 1, 28, 28))  # moves the running statistics
    fresh = _small_cnn()
    fresh.load_state_dict(converted.state_dict())
    fresh.eval(); converted.eval()
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(converted(x), fresh(x), rtol=1e-5, atol=1e-5)
