"""Vision Mamba variants, registered in timm's model registry on import of ``ouromamba_fx``.

    >>> import timm, ouromamba_fx
    >>> model = timm.create_model("vim_tiny_patch16_224")                       # random weights
    >>> model = timm.create_model("vim_small_patch16_224", checkpoint="vim_s.pth")  # doctest: +SKIP
    >>> ref = timm.create_model("vim_cifar_d128_l8", pretrained=True)          # bundled weights

No weights can be fetched from a hub: ``pretrained=True`` works only for the bundled reference
model; for the others pass ``checkpoint=<file>`` (hustvl/Vim ``.pth`` or safetensors).
"""

from __future__ import annotations

from ouromamba_fx.models.catalog import BUNDLED, CONFIGS, bundled_checkpoint, config_for
from ouromamba_fx.models.loader import load
from ouromamba_fx.models.upstream import register_builders, without_hub_options
from ouromamba_fx.models.vim import VimConfig, VisionMamba


def create(name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs) -> VisionMamba:
    """Build a registered Vision Mamba; ``checkpoint`` loads weights strictly."""
    if pretrained and checkpoint is None:
        if name not in BUNDLED:
            raise RuntimeError(
                f"{name}: no weights can be downloaded by ouromamba-fx; pass checkpoint=<file> "
                f"(a hustvl/Vim .pth or a safetensors file). Bundled: {', '.join(BUNDLED)}")
        checkpoint = bundled_checkpoint(name)
    kwargs = without_hub_options(name, kwargs)
    if checkpoint is not None:
        return load(checkpoint, name=name, **kwargs)
    cfg = VimConfig(**{**config_for(name).to_dict(), **kwargs})
    return VisionMamba(cfg)


register_builders(CONFIGS, create, lambda name: f"Vision Mamba {name} (ouromamba-fx).", globals())
