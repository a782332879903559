"""One module instance given another forward: the module, its weights and its names stay as they are.

aegis/lora.py, aegis/norms.py and aegis/tiled.py change how a training build computes this way. The instance's class
becomes a subclass of its own (one per class and forward, with the same name) whose forward is the new one. A
forward object stored on each instance would not do: torch.compile guards it by identity, so every layer would
compile its block anew, and past torch's recompile limit the remaining layers would run uncompiled. `given` tells
whether an instance already has the forward, so giving it twice changes nothing; `take_back` undoes it.
"""

from __future__ import annotations

from torch import nn

_MADE: dict[tuple[type, object], type] = {}


def given(module: nn.Module, fn) -> bool:
    """Whether `module` already runs `fn` as its forward."""
    return type(module).__dict__.get("_given_forward") is fn


def give(module: nn.Module, fn, **state) -> bool:
    """Make `fn(module, own_forward, <the call's arguments>)` this instance's forward, once; `own_forward` is its
    class's forward, bound, and `state` is set on the instance first (the values `fn` reads from it). False where it
    has the forward already."""
    if given(module, fn):
        return False
    cls = type(module)
    sub = _MADE.get((cls, fn))
    if sub is None:

        def forward(self, *args, **kwargs):
            return fn(self, cls.forward.__get__(self), *args, **kwargs)

        sub = _MADE[cls, fn] = type(
            cls.__name__, (cls,), {"forward": forward, "_given_forward": fn, "__module__": cls.__module__}
        )
    for name, value in state.items():
        setattr(module, name, value)
    module.__class__ = sub
    return True


def take_back(module: nn.Module) -> None:
    """The instance's own class and forward again."""
    if "_given_forward" in type(module).__dict__:
        module.__class__ = type(module).__bases__[0]
