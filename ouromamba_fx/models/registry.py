"""Vision Mamba variants, registered in timm's model registry on import of ``ouromamba_fx``.

    >>> import timm, ouromamba_fx
    >>> model = timm.create_model("vim_tiny_patch16_224")                       # random weights
    >>> model = timm.create_model("vim_small_patch16_224", checkpoint="vim_s.pth")  # doctest: +SKIP
    >>> ref = timm.create_model("vim_cifar_d128_l8", pretrained=True)          # bundled weights

No weights can be fetched from a hub: ``pretrained=True`` works only for the bundled reference
model; for the others pass ``checkpoint=<file>`` (hustvl/Vim ``.pth`` or safetensors).
"""

from __future__ import annotations

from importlib import resources

from timm.models import register_model

from ouromamba_fx.models.vim import VimConfig, VisionMamba

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

CONFIGS: dict[str, VimConfig] = {
    "vim_tiny_patch16_224": VimConfig(embed_dim=192, depth=24),
    "vim_small_patch16_224": VimConfig(embed_dim=384, depth=24),
    "vim_base_patch16_224": VimConfig(embed_dim=768, depth=24),
    # The reference model bundled with the package (trained on CIFAR-10, see its model card).
    "vim_cifar_d128_l8": VimConfig(img_size=32, patch_size=4, embed_dim=128, depth=8,
                                   num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD, crop_pct=1.0),
}
_TIMM_KWARGS = {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}
BUNDLED = {"vim_cifar_d128_l8": "vim_cifar_d128_l8.safetensors"}


def config_for(name: str) -> VimConfig:
    from ouromamba_fx.errors import UnknownNameError

    if name not in CONFIGS:
        raise UnknownNameError(f"unknown model {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def bundled_checkpoint(name: str = "vim_cifar_d128_l8") -> str:
    """Path of a checkpoint shipped inside the package."""
    return str(resources.files("ouromamba_fx") / "assets" / BUNDLED[name])


def create(name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs) -> VisionMamba:
    """Build a registered Vision Mamba; ``checkpoint`` loads weights strictly."""
    from ouromamba_fx.models.loader import load

    if pretrained and checkpoint is None:
        if name not in BUNDLED:
            raise RuntimeError(
                f"{name}: no weights can be downloaded by ouromamba-fx; pass checkpoint=<file> "
                f"(a hustvl/Vim .pth or a safetensors file). Bundled: {', '.join(BUNDLED)}")
        checkpoint = bundled_checkpoint(name)
    # timm.create_model passes its own hub options; nothing is fetched, so they are dropped.
    kwargs = {k: v for k, v in kwargs.items() if k not in _TIMM_KWARGS or v is not None}
    for k in _TIMM_KWARGS & set(kwargs):
        raise TypeError(f"{name}: timm option {k}={kwargs[k]!r} is not supported (nothing is "
                        f"downloaded); pass checkpoint=<file> instead")
    if checkpoint is not None:
        return load(checkpoint, name=name, **kwargs)
    cfg = VimConfig(**{**config_for(name).to_dict(), **kwargs})
    return VisionMamba(cfg)


def _register(name: str) -> None:
    def fn(pretrained: bool = False, **kwargs) -> VisionMamba:
        return create(name, pretrained=pretrained, **kwargs)

    fn.__name__ = name
    fn.__qualname__ = name
    fn.__doc__ = f"Vision Mamba {name} (ouromamba-fx)."
    fn.__module__ = __name__
    globals()[name] = fn
    register_model(fn)


for _name in CONFIGS:
    _register(_name)
