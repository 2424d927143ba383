"""What the model families share: recognising another project's class by name, and registering
the package's builders with timm."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.nn as nn
from timm.models import register_model


def is_upstream(module: nn.Module, class_name: str) -> bool:
    """True if ``module``'s class is called ``class_name`` and is not one of this package's own
    (the upstream file, a pip package, or a copy of it such as Hugging Face remote code)."""
    cls = type(module)
    return cls.__name__ == class_name and not cls.__module__.startswith("ouromamba_fx.")


#: Hub options ``timm.create_model`` passes to every builder; nothing is fetched, so they are dropped
#: when unset and refused when set.
TIMM_HUB_KWARGS = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"})


def without_hub_options(name: str, kwargs: dict) -> dict:
    """``kwargs`` without timm's unset hub options; a ``TypeError`` naming the model for a set one."""
    kwargs = {k: v for k, v in kwargs.items() if k not in TIMM_HUB_KWARGS or v is not None}
    for k in TIMM_HUB_KWARGS & set(kwargs):
        raise TypeError(f"{name}: timm option {k}={kwargs[k]!r} is not supported (nothing is "
                        f"downloaded); pass checkpoint=<file> instead")
    return kwargs


def register_builders(names: Iterable[str], create: Callable[..., nn.Module], describe: Callable[[str], str],
                      namespace: dict) -> None:
    """For each name, a ``name(pretrained=False, **kwargs)`` builder calling ``create(name, ...)``,
    put in ``namespace`` (a module's globals) and registered with timm, so ``timm.create_model(name)``
    finds it. ``describe(name)`` is its docstring."""
    for name in names:
        fn = _builder(name, create)
        fn.__doc__ = describe(name)
        fn.__module__ = namespace["__name__"]
        namespace[name] = fn
        register_model(fn)


def _builder(name: str, create: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def fn(pretrained: bool = False, **kwargs) -> nn.Module:
        return create(name, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    return fn
