"""Named activation sites and a context manager that hooks them and always unhooks.

Site names follow TransformerLens:
  blocks.{l}.mlp.hook_post    the neuron activation, i.e. the input of the down projection  [..., d_ff]
  blocks.{l}.mlp.hook_gate    the activation function's output act(W_gate x)                 [..., d_ff]
                              (equal to hook_post for a plain, ungated FFN)
  blocks.{l}.hook_resid_post  the decoder block's output, the residual stream               [..., d_model]
A hook function receives the tensor and returns None (observe) or a tensor of the same shape
(replace). Leading dimensions are [batch, seq] for most models and [batch * seq] for some FFNs
(OPT flattens tokens), so hooks that need tokens should `reshape(-1, width)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from babel_lib.errors import BabelError
from babel_lib.core.ffn import ffn_layers

HookFn = Callable[[torch.Tensor], torch.Tensor | None]

_SITE = re.compile(r"^blocks\.(\d+)\.(mlp\.hook_post|mlp\.hook_gate|hook_resid_post)$")
SITES = ("mlp.hook_post", "mlp.hook_gate", "hook_resid_post")


def site(layer: int, kind: str) -> str:
    """The name of site `kind` (one of SITES) at decoder layer `layer`."""
    return f"blocks.{layer}.{kind}"


def _pre_hook(fn: HookFn):
    def hook(module, args):
        out = fn(args[0])
        return None if out is None else (out, *args[1:])
    return hook


def _post_hook(fn: HookFn):
    def hook(module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        out = fn(first)
        if out is None:
            return None
        return (out, *output[1:]) if isinstance(output, tuple) else out
    return hook


def _register(model: nn.Module, name: str, fn: HookFn) -> torch.utils.hooks.RemovableHandle:
    match = _SITE.match(name)
    layers = ffn_layers(model)
    if match is None or int(match.group(1)) >= len(layers):
        raise BabelError(
            f"unknown activation site {name!r}; sites are blocks.{{l}}.{{{', '.join(SITES)}}} "
            f"with 0 <= l < {len(layers)}"
        )
    ffn = layers[int(match.group(1))]
    kind = match.group(2)
    if kind == "mlp.hook_post":
        return ffn.down.register_forward_pre_hook(_pre_hook(fn))
    if kind == "mlp.hook_gate":
        return ffn.act.register_forward_hook(_post_hook(fn))
    return ffn.block.register_forward_hook(_post_hook(fn))


@contextmanager
def hooked(model: nn.Module, hooks: Mapping[str, HookFn]) -> Iterator[nn.Module]:
    """Run `model` with `hooks` ({site name: function}) attached; they come off on exit, even on error."""
    handles = []
    try:
        for name, fn in hooks.items():
            handles.append(_register(model, name, fn))
        yield model
    finally:
        for handle in handles:
            handle.remove()
