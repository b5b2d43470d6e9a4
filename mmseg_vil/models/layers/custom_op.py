"""``torch.library.custom_op`` with a direct path for eager calls on plain tensors.

Why: our Triton kernels are custom ops so that torch.compile, export and fake tensors see one opaque node with its
fake and autograd registrations. In eager mode that costs the host the dispatcher, torch.library's checks and its
autograd wrapper (a pytree pass and a ``detach`` per input) on every call: a ViL-T training step makes about 200
such calls, and its eager step waits for the host (H100 host, 224 px, batch 64: 139 ms to issue a step through the
dispatcher, 115 ms directly, for 16 ms of GPU work; RESULTS.md). :func:`custom_op` registers the op as usual
and returns a :class:`CustomOp`; calling it runs the function itself (under a plain ``torch.autograd.Function`` with
the registered setup and backward where autograd records), unless the call needs the dispatcher: while torch.compile
or export traces, under a dispatch mode (fake tensors, schema checks, flop counters) or JIT tracing, or for tensor
subclasses. Same function, same gradients either way.
"""
import typing
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import Parameter

_PLAIN = (Tensor, Parameter)


def _plain_tensors(args) -> bool:
    """Whether every tensor among ``args`` (also inside lists) is a plain tensor, not a subclass or a proxy. Type
    identity first: this runs on every call of an op."""
    for arg in args:
        kind = type(arg)
        if kind in _PLAIN or kind in (int, float, bool) or arg is None:
            continue
        if kind in (list, tuple):
            if not _plain_tensors(arg):
                return False
        elif isinstance(arg, (Tensor, torch.fx.Proxy)):
            return False
    return True


def runs_directly(args) -> bool:
    """Whether a call with ``args`` may skip the dispatcher (module docstring)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
                or not _plain_tensors(args))


class CustomOp:
    """A registered custom op (``op``: torch.library's ``CustomOpDef``) that eager calls on plain tensors run
    directly (module docstring). Registrations go to ``op``; pass ``op`` to ``torch.library.opcheck``."""

    def __init__(self, op, fn: Callable) -> None:
        self.op, self._fn = op, fn
        self._autograd: Optional[Callable] = None  # fn under the registered formula (autograd.Function)
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        self._autograd = _autograd_function(self._fn, backward, setup_context)

    def __call__(self, *args, **kwargs):
        if kwargs or not runs_directly(args):  # keyword arguments: the op's schema binds them
            return self.op(*args, **kwargs)
        if self._autograd is not None and torch.is_grad_enabled() and any(
                isinstance(arg, Tensor) and arg.requires_grad for arg in args):
            return self._autograd(*args)
        return self._fn(*args)


def _autograd_function(fn: Callable, backward: Callable, setup_context: Callable) -> Callable:
    """``fn`` under the op's registered formula as an autograd.Function (its nodes named ``<fn>_eagerBackward``).
    ``fn`` returns a tensor, a tuple or a list of tensors, as its return annotation says (torch.library reads the
    op's schema from it): a Function returns a tuple, so a list is given back as a list, and ``backward`` gets the
    output gradients as torch.library passes them (one argument per tuple entry, a list as one argument)."""
    returns_list = typing.get_origin(typing.get_type_hints(fn)['return']) is list

    def forward(ctx, *args):
        out = fn(*args)
        setup_context(ctx=ctx, inputs=args, output=out)
        return tuple(out) if returns_list else out

    def backward_structured(ctx, *grads):
        return backward(ctx, list(grads)) if returns_list else backward(ctx, *grads)

    function = type(f'{fn.__name__}_eager', (torch.autograd.Function,),
                    dict(forward=staticmethod(forward), backward=staticmethod(backward_structured)))

    def apply(*args):
        out = function.apply(*args)
        return list(out) if returns_list else out

    return apply


def custom_op(name: str) -> Callable[[Callable], CustomOp]:
    """``torch.library.custom_op(name, mutates_args=())`` as a :class:`CustomOp` (decorator)."""
    def register(fn: Callable) -> CustomOp:
        return CustomOp(torch.library.custom_op(name, mutates_args=())(fn), fn)
    return register
