"""``convert``: a model onto convkit's modules, with BatchNorm2d -> activation pairs fused.

Two passes find the pairs:
  * structural: a BatchNorm2d immediately followed by an activation module in an
    ``nn.Sequential`` (torchvision's Conv2dNormActivation, DenseNet's transitions, ...);
  * code: every other module whose own ``forward`` calls a batch norm (or a Sequential ending
    in one) is traced with ``torch.fx`` (its children as opaque calls) and each batch-norm call
    whose only reader is an activation (a module, ``F.relu``-style function or ``.relu()``) is
    fused (ResNet's ``bn1 -> relu``, DenseNet's ``norm -> relu``, GoogLeNet's ``F.relu``).
Fusing swaps the batch norm's class for the fused one (its parameters, buffers, hooks and mode
stay). The activation then has to stop acting on the fused output: an activation module that
nothing else calls becomes ``nn.Identity`` (it has no state, so the ``state_dict`` keys do
not change); one that is also called elsewhere (ResNet's blocks call ``self.relu`` twice) or a
function call is removed from the traced graph instead, and the module's forward becomes that
graph's code: a ``torch.fx.GraphModule`` with the module's class name and all of its
submodules, parameters, buffers and attributes. A module whose traced code differs between
train and eval mode, that has hooks, or that is reached twice in the model is left alone, so
the converted model computes what the original did in either mode.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from convkit.functional import activation_arguments, activation_name
from convkit.nn import (BatchNorm2d, BatchNormActivation2d, BatchNormReLU2d, Conv2d,
                        SyncBatchNorm)

Activation = tuple[str, float, float]

# Activation modules by exact type (subclasses may change forward) -> the fused kernel's form.
_ACTIVATION_MODULES: dict[type, Callable[[nn.Module], Activation]] = {
    nn.ReLU: lambda m: ("relu", 0.0, 0.0),
    nn.ReLU6: lambda m: ("hardtanh", float(m.min_val), float(m.max_val)),
    nn.Hardtanh: lambda m: ("hardtanh", float(m.min_val), float(m.max_val)),
    nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope), 0.0),
    nn.SiLU: lambda m: ("silu", 0.0, 0.0),
    nn.Hardswish: lambda m: ("hardswish", 0.0, 0.0),
}

# Activation functions -> (kernel name, their parameters after the input with defaults, and
# how those map to (alpha, beta)). "inplace" is accepted and ignored: the batch norm's output
# has no other reader, so acting in place or not is the same.
_FUNCTION_PARAMETERS: dict[Callable, tuple[str, tuple[tuple[str, Any], ...]]] = {
    F.relu: ("relu", (("inplace", False),)),
    F.relu_: ("relu", ()),
    torch.relu: ("relu", ()),
    torch.relu_: ("relu", ()),
    F.relu6: ("relu6", (("inplace", False),)),
    F.hardtanh: ("hardtanh", (("min_val", -1.0), ("max_val", 1.0), ("inplace", False))),
    F.hardtanh_: ("hardtanh", (("min_val", -1.0), ("max_val", 1.0))),
    F.leaky_relu: ("leaky_relu", (("negative_slope", 0.01), ("inplace", False))),
    F.leaky_relu_: ("leaky_relu", (("negative_slope", 0.01),)),
    F.silu: ("silu", (("inplace", False),)),
    F.hardswish: ("hardswish", (("inplace", False),)),
}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}


@dataclasses.dataclass
class FusionSummary:
    """What ``convert`` did: modules moved onto convkit, BatchNorm+activation pairs fused (by
    the activation), modules whose forward became a fused fx graph, and modules whose forward
    could not be traced (their code's pairs stay unfused)."""

    converted: int = 0
    fused: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rewritten: list[str] = dataclasses.field(default_factory=list)
    untraced: list[str] = dataclasses.field(default_factory=list)

    @property
    def pairs(self) -> int:
        return sum(self.fused.values())

    def __str__(self) -> str:
        kinds = ", ".join(f"{name} {count}" for name, count in sorted(self.fused.items()))
        line = (f"convkit.nn.convert: {self.converted} modules on convkit; {self.pairs} "
                f"BatchNorm+activation pairs fused" + (f" ({kinds})" if kinds else ""))
        if self.rewritten:
            count = len(self.rewritten)
            line += f"; {count} forward{'s' if count > 1 else ''} rewritten by torch.fx"
        if self.untraced:
            count = len(self.untraced)
            line += f"; {count} forward{'s' if count > 1 else ''} left unfused"
        return line


def _has_hooks(module: nn.Module) -> bool:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
             "_load_state_dict_post_hooks")
    return any(getattr(module, name, None) for name in hooks)


def _fusable_batch_norm(module: nn.Module) -> bool:
    return (type(module) is BatchNorm2d and module.fused_activation[0] == "none"
            and not _has_hooks(module))


def _fuse(batch_norm: BatchNorm2d, activation: Activation, summary: FusionSummary) -> None:
    if activation == ("relu", 0.0, 0.0):
        batch_norm.__class__ = BatchNormReLU2d
    else:
        batch_norm.__class__ = BatchNormActivation2d
        batch_norm.fused_activation = activation
    summary.fused[activation_name(activation)] += 1


def _identity_like(module: nn.Module) -> nn.Identity:
    identity = nn.Identity()
    identity.train(module.training)
    return identity


def _module_activation(module: nn.Module) -> Optional[Activation]:
    spec = _ACTIVATION_MODULES.get(type(module))
    if spec is None or _has_hooks(module):
        return None
    return spec(module)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _reference_counts(model: nn.Module) -> collections.Counter:
    """How many places of the model hold each module (by identity)."""
    return collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))


def _fuse_sequentials(model: nn.Module, references: collections.Counter,
                      summary: FusionSummary) -> None:
    for module in model.modules():
        if not _is_plain_sequential(module):
            continue
        names = list(module._modules.keys())
        for name, next_name in zip(names, names[1:]):
            current, following = module._modules[name], module._modules[next_name]
            if current is None or following is None or not _fusable_batch_norm(current):
                continue
            activation = _module_activation(following)
            # A batch norm held elsewhere too would be fused there as well.
            if activation is None or references[id(current)] != 1:
                continue
            _fuse(current, activation, summary)
            module._modules[next_name] = _identity_like(following)


def _final_batch_norm(module: nn.Module) -> Optional[BatchNorm2d]:
    """The batch norm whose output is ``module``'s output: the module itself, or the last
    module of a plain Sequential chain (without hooks) ending in one; else None."""
    while _is_plain_sequential(module) and len(module) > 0 and not _has_hooks(module):
        module = module[len(module) - 1]
    return module if _fusable_batch_norm(module) else None


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a call."""

    def __init__(self, root: Optional[nn.Module] = None) -> None:
        # root None: every module is a leaf (how fx re-traces a pickled GraphModule's code).
        super().__init__()
        self.traced_root = root

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.traced_root


def _trace(module: nn.Module, training: bool) -> fx.Graph:
    was_training = module.training
    module.training = training  # only this module's flag: its own code is what is traced
    try:
        return _ChildrenAsLeaves(module).trace(module)
    finally:
        module.training = was_training


def _function_activation(node: fx.Node) -> Optional[Activation]:
    """The activation a call_function/call_method node applies to its first argument, when
    its parameters are constants; else None."""
    if node.op == "call_method":
        name = _ACTIVATION_METHODS.get(node.target)
        if name is None or len(node.args) != 1 or node.kwargs:
            return None
        return activation_arguments(name)
    if node.op != "call_function" or node.target not in _FUNCTION_PARAMETERS:
        return None
    name, parameters = _FUNCTION_PARAMETERS[node.target]
    if len(node.args) - 1 > len(parameters):
        return None
    values = {key: default for key, default in parameters}
    for (key, _), value in zip(parameters, node.args[1:]):
        values[key] = value
    for key, value in node.kwargs.items():
        if key not in values:
            return None
        values[key] = value
    if any(isinstance(v, fx.Node) or not isinstance(v, (bool, int, float)) for v in values.values()):
        return None
    return activation_arguments(name, negative_slope=values.get("negative_slope", 0.01),
                                min_val=values.get("min_val", -1.0),
                                max_val=values.get("max_val", 1.0))


def _module_calls(graph: fx.Graph) -> collections.Counter:
    """How many times the traced code calls each submodule (by target)."""
    return collections.Counter(n.target for n in graph.nodes if n.op == "call_module")


def _fx_pairs(module: nn.Module, graph: fx.Graph, references: collections.Counter,
              calls: collections.Counter):
    """(batch-norm node, its batch norm, activation node, activation, activation module or
    None) for each fusable pair of the traced graph."""
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        batch_norm = _final_batch_norm(module.get_submodule(node.target))
        if batch_norm is None or references[id(batch_norm)] != 1:
            continue
        (user,) = node.users
        if not user.args or user.args[0] is not node or node in user.args[1:] \
                or node in user.kwargs.values():
            continue
        activation_module = None
        if user.op == "call_module":
            activation_module = module.get_submodule(user.target)
            activation = _module_activation(activation_module)
            if len(user.args) != 1 or user.kwargs:
                activation = None
        else:
            activation = _function_activation(user)
        if activation is not None:
            pairs.append((node, batch_norm, user, activation, activation_module))
    return pairs


def _restore_state(rewritten: fx.GraphModule, state: dict[str, Any]) -> None:
    """Puts back what fx keeps only when its graph uses it: every submodule, parameter and
    buffer in its order, plain attributes, and the train/eval flag."""
    rewritten._modules = collections.OrderedDict(state["_modules"])
    rewritten._parameters = collections.OrderedDict(state["_parameters"])
    rewritten._buffers = collections.OrderedDict(state["_buffers"])
    rewritten._non_persistent_buffers_set = set(state["_non_persistent_buffers_set"])
    for key, value in state.items():
        if key not in rewritten.__dict__:
            rewritten.__dict__[key] = value
    rewritten.training = state["training"]


class FusedForward(fx.GraphModule):
    """A module whose forward ``convert`` rewrote (its traced code, with the fused
    activations' calls removed), holding all of the original's state; it keeps all of it
    through ``copy.deepcopy`` and pickling too (a plain GraphModule keeps only what its graph
    uses)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "FusedForward":
        # fx's copy first: it puts the copy in the memo, so the state copied next shares its
        # submodules and a reference back to this module resolves to the copy.
        copied = super().__deepcopy__(memo)
        _restore_state(copied, copy.deepcopy(dict(self.__dict__), memo))
        return copied

    def __reduce__(self):
        rebuild, arguments = super().__reduce__()
        state = {key: value for key, value in self.__dict__.items() if key != "_graph"}
        return (_rebuild_fused_forward, (rebuild, arguments, state))


def _rebuild_fused_forward(rebuild, arguments, state) -> FusedForward:
    rebuilt = rebuild(*arguments)
    rebuilt.__class__ = type(
        type(rebuilt).__name__, (FusedForward,), {"forward": type(rebuilt).forward})
    _restore_state(rebuilt, state)
    return rebuilt


def _graph_module(module: nn.Module, graph: fx.Graph) -> FusedForward:
    """``graph`` as ``module``'s forward, with all of ``module``'s state."""
    rewritten = FusedForward(module, graph, class_name=type(module).__name__)
    _restore_state(rewritten, dict(module.__dict__))
    return rewritten


def _fuse_forward_code(module: nn.Module, references: collections.Counter,
                       summary: FusionSummary, qualified_name: str) -> Optional[nn.Module]:
    """Fuses the pairs of ``module``'s own forward; returns the module that replaces it when
    its forward had to be rewritten, else None."""
    try:
        graph = _trace(module, module.training)
        other_mode = _trace(module, not module.training)
    except Exception:  # noqa: BLE001 - any failure of symbolic tracing means "not traceable"
        summary.untraced.append(
            f"{qualified_name or 'the model'} ({type(module).__name__}, not traceable)")
        return None
    if graph.python_code("self").src != other_mode.python_code("self").src:
        summary.untraced.append(
            f"{qualified_name or 'the model'} ({type(module).__name__}, mode-dependent forward)")
        return None
    calls = _module_calls(graph)
    pairs = _fx_pairs(module, graph, references, calls)
    if not pairs:
        return None
    rewrite = False
    for node, batch_norm, user, activation, activation_module in pairs:
        keeps_module = (activation_module is not None and calls[user.target] == 1
                        and references[id(activation_module)] == 1)
        if not keeps_module and (references[id(module)] != 1 or _has_hooks(module)):
            continue  # its code cannot change: reached elsewhere, or hooked
        _fuse(batch_norm, activation, summary)
        if keeps_module:
            parent_name, _, child_name = user.target.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            parent._modules[child_name] = _identity_like(activation_module)
        else:
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            rewrite = True
    if not rewrite:
        return None
    graph.lint()
    summary.rewritten.append(qualified_name or "the model")
    return _graph_module(module, graph)


def _has_batch_norm_child(module: nn.Module) -> bool:
    """Whether ``module``'s own forward may call a batch norm: a child is one (or a Sequential
    ending in one), or holds one in a ModuleList/ModuleDict."""
    for child in module.children():
        if child is None:
            continue
        if _final_batch_norm(child) is not None:
            return True
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and _has_batch_norm_child(child):
            return True
    return False


def _fuse_traced(model: nn.Module, references: collections.Counter,
                 summary: FusionSummary) -> nn.Module:
    """The code pass over every module with a batch-norm child; returns the model (itself
    replaced when its own forward was rewritten)."""
    candidates = [(name, m) for name, m in model.named_modules()
                  if not _is_plain_sequential(m) and _has_batch_norm_child(m)
                  and not type(m).__module__.startswith("torch.nn")]
    replacements = {}
    for name, module in candidates:
        replacement = _fuse_forward_code(module, references, summary, name)
        if replacement is not None:
            replacements[name] = replacement
    for name, replacement in replacements.items():
        if not name:
            model = replacement
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[child_name] = replacement
    return model


def _swap_classes(model: nn.Module, summary: FusionSummary) -> nn.Module:
    # Swapping the class keeps every parameter, buffer, hook, dtype, device and the train/eval
    # flag exactly as they are: the modules differ only in forward. Exact type checks leave
    # user subclasses (which may change forward) alone.
    swaps = {nn.Conv2d: Conv2d, nn.BatchNorm2d: BatchNorm2d}
    for module in model.modules():
        target = swaps.get(type(module))
        if target is not None:
            module.__class__ = target
            summary.converted += 1
    return model


def convert(module: nn.Module, inplace: bool = False, sync_batchnorm: bool = False,
            process_group=None, fuse: bool = True, verbose: bool = False) -> nn.Module:
    """The model with every ``nn.Conv2d`` and ``nn.BatchNorm2d`` running on convkit.

    With ``fuse`` (the default) each BatchNorm2d whose output goes only to a ReLU, ReLU6,
    Hardtanh, LeakyReLU, SiLU or Hardswish becomes one fused batch norm + activation
    (``BatchNormReLU2d`` or ``BatchNormActivation2d``), inside ``nn.Sequential`` and in forward
    code (through ``torch.fx``; see this module's docstring for what changes). The
    ``state_dict`` keys never change, and nothing with hooks is fused. A module whose forward
    cannot be traced keeps its code's pairs unfused, with one warning naming them all.
    ``verbose=True`` prints one line of what was converted and fused (``fusion_summary`` gives
    the counts of any model). With ``sync_batchnorm=True`` the batch norms become
    ``SyncBatchNorm`` / ``SyncBatchNormReLU2d`` / ``SyncBatchNormActivation2d``, synchronised
    over ``process_group`` (default: the whole world) when trained under torch.distributed.
    Weights, buffers, dtype, device and train/eval mode are carried over. Works on a deep copy
    unless ``inplace=True`` (a model whose own forward is rewritten is returned as a new
    GraphModule either way).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(module).__name__}")
    model = module if inplace else copy.deepcopy(module)
    summary = FusionSummary()
    model = _swap_classes(model, summary)
    if fuse:
        references = _reference_counts(model)
        _fuse_sequentials(model, references, summary)
        model = _fuse_traced(model, references, summary)
        if summary.untraced:
            warnings.warn(
                "convkit.nn.convert: the BatchNorm2d -> activation pairs in the forward code of "
                f"{', '.join(summary.untraced)} stay unfused (torch.fx could not trace it, or its "
                "code differs between train and eval mode); those inside nn.Sequential are fused",
                stacklevel=2)
    if sync_batchnorm:
        SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    if verbose:
        print(summary)
    return model


def fusion_summary(model: nn.Module) -> FusionSummary:
    """The fused batch norms of a model, by activation, and its modules whose forward
    ``convert`` rewrote."""
    summary = FusionSummary()
    for name, module in model.named_modules():
        activation = getattr(module, "fused_activation", None)
        if isinstance(module, (BatchNorm2d, SyncBatchNorm)):
            summary.converted += 1
            if activation is not None and activation[0] != "none":
                summary.fused[activation_name(activation)] += 1
        elif isinstance(module, Conv2d):
            summary.converted += 1
        if isinstance(module, FusedForward):
            summary.rewritten.append(name or "the model")
    return summary
