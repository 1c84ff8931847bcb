"""convkit.nn.convert's fusion of BatchNorm2d -> activation: in nn.Sequential and in forward
code (torch.fx), which pairs it must leave alone, what the converted model keeps (state_dict
keys, mode, deepcopy, pickling), and the torchvision zoo in float64 against torch's model."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convkit
from convkit.conversion import FusedForward
from convkit.nn import (BatchNorm2d, BatchNormActivation2d, BatchNormReLU2d, SyncBatchNorm,
                        SyncBatchNormActivation2d, convert, fusion_summary)

D = torch.float64

ACTIVATION_MODULES = [
    (nn.ReLU(), "relu"), (nn.ReLU(inplace=True), "relu"), (nn.ReLU6(), "relu6"),
    (nn.Hardtanh(-0.5, 2.0), "hardtanh"), (nn.LeakyReLU(0.2), "leaky_relu"), (nn.SiLU(), "silu"),
    (nn.Hardswish(), "hardswish"),
]


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics in every batch norm."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def _assert_same_model(original: nn.Module, converted: nn.Module, x: torch.Tensor,
                       tol: float = 1e-9) -> None:
    """Outputs, parameter gradients and buffers (running statistics) of the two models on
    the same input agree; the state_dict keys are the same."""
    assert list(converted.state_dict().keys()) == list(original.state_dict().keys())
    y_original = original(x)
    y_converted = converted(x)
    torch.testing.assert_close(y_converted, y_original, rtol=tol, atol=tol)
    dy = torch.randn_like(y_original)
    y_original.backward(dy)
    y_converted.backward(dy)
    converted_parameters = dict(converted.named_parameters())
    for name, p in original.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(converted_parameters[name].grad, p.grad, rtol=tol * 10,
                                       atol=tol * 10, msg=name)
    converted_buffers = dict(converted.named_buffers())
    for name, b in original.named_buffers():
        torch.testing.assert_close(converted_buffers[name], b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("activation, name", ACTIVATION_MODULES, ids=lambda a: str(a))
def test_sequential_pairs_fuse_every_activation(activation, name, mode):
    original = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                        copy.deepcopy(activation), nn.Conv2d(4, 2, 1))).double()
    original.train(mode == "train")
    converted = convert(original)
    fused = converted[1]
    assert isinstance(fused, BatchNorm2d) and fused.fused_activation[0] != "none"
    assert type(fused) is (BatchNormReLU2d if name == "relu" else BatchNormActivation2d)
    assert type(converted[2]) is nn.Identity
    assert converted[2].training == original.training
    assert dict(fusion_summary(converted).fused) == {name: 1}
    _assert_same_model(original, converted, torch.randn(4, 3, 6, 5, dtype=D) * 2)


class _FunctionalActivation(nn.Module):
    """Batch norms followed by activations written as functions and methods in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(7))

    def forward(self, x):
        x = F.relu(self.bns[0](self.conv(x)), inplace=True)
        x = torch.relu(self.bns[1](x))
        x = self.bns[2](x).relu()
        x = F.leaky_relu(self.bns[3](x), 0.3)
        x = F.hardtanh(self.bns[4](x), min_val=-0.25, max_val=1.5)
        x = F.silu(self.bns[5](x))
        return F.relu6(self.bns[6](x))


class _SharedActivation(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.unused = nn.Linear(2, 2)  # in no forward: must survive the rewrite
        self.stride = 1  # a plain attribute other code may read

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_code_pairs_fuse_through_fx(mode):
    original = _randomise(_FunctionalActivation()).double().train(mode == "train")
    converted = convert(original)
    assert isinstance(converted, FusedForward)
    kinds = [bn.fused_activation for bn in converted.bns]
    assert kinds == [("relu", 0.0, 0.0)] * 3 + [("leaky_relu", 0.3, 0.0), ("hardtanh", -0.25, 1.5),
                                                 ("silu", 0.0, 0.0), ("hardtanh", 0.0, 6.0)]
    _assert_same_model(original, converted, torch.randn(4, 3, 5, 5, dtype=D))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shared_activation_module_fuses_by_rewriting_forward(mode):
    original = _randomise(nn.Sequential(_SharedActivation(), nn.Conv2d(4, 2, 1))).double()
    original.train(mode == "train")
    converted = convert(original)
    block = converted[0]
    assert isinstance(block, FusedForward) and type(block).__name__ == "_SharedActivation"
    assert type(block.bn1) is BatchNormReLU2d and type(block.bn2) is BatchNorm2d
    assert type(block.relu) is nn.ReLU  # still applied after the addition
    assert block.stride == 1 and isinstance(block.unused, nn.Linear)
    assert fusion_summary(converted).rewritten == ["0"]
    x = torch.randn(3, 4, 5, 5, dtype=D)
    _assert_same_model(original, converted, x)
    # deepcopy and pickling keep all of the state (fx alone would drop `unused`).
    copied = copy.deepcopy(converted)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        assert list(other.state_dict().keys()) == list(converted.state_dict().keys())
        assert isinstance(other[0], FusedForward) and other[0].stride == 1
        assert type(other[0].bn1) is BatchNormReLU2d
        torch.testing.assert_close(other(x), converted(x), rtol=0, atol=0)


class _BatchNormReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.bn(x)
        return self.act(y) + y


class _ModeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.SiLU()

    def forward(self, x):
        if self.training:
            return self.act(self.bn(x))
        return self.bn(x) * 2


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.block = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: symbolic tracing fails
            x = -x
        return F.relu(self.block(self.bn(x)))


def test_pairs_that_must_stay_apart():
    # The batch norm's output has another reader: no fusion.
    read_twice = convert(_BatchNormReadTwice())
    assert type(read_twice.bn) is BatchNorm2d and type(read_twice.act) is nn.ReLU
    # Hooks: fusing would change what a hook sees or skip it.
    hooked = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    hooked[1].register_forward_hook(lambda *args: None)
    assert type(convert(hooked)[0]) is BatchNorm2d
    # A batch norm held twice would be fused at both places.
    bn = nn.BatchNorm2d(3)
    shared = nn.Sequential(bn, nn.ReLU(), bn)
    assert type(convert(shared)[0]) is BatchNorm2d
    # A subclass of an activation may compute something else.
    class MyReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) * 2
    assert type(convert(nn.Sequential(nn.BatchNorm2d(3), MyReLU()))[0]) is BatchNorm2d
    # fuse=False converts without fusing.
    plain = convert(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), fuse=False)
    assert type(plain[0]) is BatchNorm2d and type(plain[1]) is nn.ReLU


def test_mode_dependent_and_untraceable_forwards_are_left_alone_with_one_warning():
    with pytest.warns(UserWarning, match="mode-dependent") as record:
        mode_dependent = convert(_ModeDependent())
    assert len(record) == 1
    assert type(mode_dependent.bn) is BatchNorm2d
    for mode in (True, False):
        original = _randomise(_ModeDependent()).double().train(mode)
        with pytest.warns(UserWarning, match="mode-dependent"):
            converted = convert(original)
        _assert_same_model(original, converted, torch.randn(4, 3, 2, 2, dtype=D))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        untraceable = convert(_Untraceable())
    assert len(record) == 1 and "stay unfused" in str(record[0].message)
    assert "_Untraceable, not traceable" in str(record[0].message)
    assert type(untraceable.bn) is BatchNorm2d
    assert type(untraceable.block[0]) is BatchNormReLU2d  # the Sequential pair still fuses


def test_verbose_prints_one_line_and_summary_counts(capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(),
                          _SharedActivation(), nn.BatchNorm2d(4), nn.SiLU())
    converted = convert(model, verbose=True)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert "3 BatchNorm+activation pairs fused" in line and "relu6 1" in line
    assert "1 forward rewritten by torch.fx" in line
    summary = fusion_summary(converted)
    assert summary.pairs == 3 and dict(summary.fused) == {"relu": 1, "relu6": 1, "silu": 1}
    assert summary.converted == 7  # 3 convs, 4 batch norms


def test_sync_batchnorm_keeps_the_fused_activation():
    model = convert(nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(0.3)), sync_batchnorm=True)
    assert type(model[0]) is SyncBatchNormActivation2d
    assert model[0].fused_activation == ("leaky_relu", 0.3, 0.0)
    assert "leaky_relu(negative_slope=0.3)" in repr(model[0])
    assert isinstance(model[0], SyncBatchNorm)
    original = _randomise(nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(0.3))).double()
    converted = convert(original, sync_batchnorm=True)
    _assert_same_model(original, converted, torch.randn(3, 4, 2, 3, dtype=D))


def test_batch_norm_activation_module_arguments_and_errors():
    module = BatchNormActivation2d(5, activation="hardtanh", min_val=-2.0, max_val=3.0)
    assert module.fused_activation == ("hardtanh", -2.0, 3.0)
    assert "hardtanh(min_val=-2.0, max_val=3.0)" in repr(module)
    assert BatchNormActivation2d(5, activation="relu6").fused_activation == ("hardtanh", 0.0, 6.0)
    assert list(module.state_dict().keys()) == list(nn.BatchNorm2d(5).state_dict().keys())
    with pytest.raises(ValueError, match="one of none, relu, relu6"):
        BatchNormActivation2d(5, activation="gelu")
    with pytest.raises(ValueError, match="min_val <= max_val"):
        BatchNormActivation2d(5, activation="hardtanh", min_val=2.0, max_val=1.0)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="expected activation to be one of"):
        torch.ops.convkit.batch_norm_forward(x, None, None, None, None, True, 1e-5, "gelu", 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"min_val \(alpha\) <= max_val \(beta\)"):
        torch.ops.convkit.batch_norm_forward(x, None, None, None, None, True, 1e-5, "hardtanh", 1.0,
                                             0.0)


# ---- the torchvision zoo, random weights, nothing downloaded

ZOO = ["resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
       "regnet_x_400mf", "densenet121", "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet",
       "vgg11_bn", "convnext_tiny"]
FAST_ZOO = {"resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
            "densenet121", "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet"}


def _zoo_model(name: str) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs)
    # Dropout and stochastic depth off: train-mode outputs must be comparable.
    for m in model.modules():
        if isinstance(m, nn.Dropout) or type(m).__name__ == "StochasticDepth":
            m.p = 0.0
    return _randomise(model)


def test_zoo_fusion_counts():
    """Every BatchNorm2d whose output only an activation reads is fused."""
    torchvision = pytest.importorskip("torchvision")
    counts = {}
    for name in ZOO:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every zoo model traces
            counts[name] = fusion_summary(convert(_zoo_model(name), inplace=True))
    resnet = torchvision.models.resnet18()
    blocks = sum(1 for m in resnet.modules() if type(m).__name__ == "BasicBlock")
    assert counts["resnet18"].pairs == 1 + blocks  # the stem and each block's bn1
    mobilenet = torchvision.models.mobilenet_v2()
    with_activation = sum(1 for m in mobilenet.modules()
                          if type(m).__name__ == "Conv2dNormActivation" and len(m) == 3)
    assert dict(counts["mobilenet_v2"].fused) == {"relu6": with_activation}
    assert counts["densenet121"].pairs == sum(
        1 for m in torchvision.models.densenet121().modules() if isinstance(m, nn.BatchNorm2d))
    assert set(counts["efficientnet_b0"].fused) == {"silu"}
    assert set(counts["mobilenet_v3_small"].fused) == {"relu", "hardswish"}
    assert counts["convnext_tiny"].pairs == 0 and counts["squeezenet1_0"].pairs == 0
    for name in ("resnext50_32x4d", "regnet_x_400mf", "shufflenet_v2_x0_5", "googlenet",
                 "vgg11_bn"):
        assert counts[name].pairs > 0, name


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST_ZOO else pytest.mark.slow)
                                  for n in ZOO])
def test_zoo_float64_matches_torch(name, mode):
    original = _zoo_model(name).double().train(mode == "train")
    converted = convert(original)
    x = torch.randn(2, 3, 64, 64, dtype=D)
    _assert_same_model(original, converted, x, tol=1e-8)
