"""The Vision Mamba variants ouromamba-fx knows by name: their configs and the bundled weights.

Plain data and two lookups, imported by the checkpoint loader and by the timm registrations
(:mod:`ouromamba_fx.models.registry`) alike.
"""

from __future__ import annotations

from importlib import resources

from ouromamba_fx.errors import UnknownNameError
from ouromamba_fx.models.vim import VimConfig

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
BUNDLED = {"vim_cifar_d128_l8": "vim_cifar_d128_l8.safetensors"}


def config_for(name: str) -> VimConfig:
    if name not in CONFIGS:
        raise UnknownNameError(f"unknown model {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def bundled_checkpoint(name: str = "vim_cifar_d128_l8") -> str:
    """Path of a checkpoint shipped inside the package."""
    return str(resources.files("ouromamba_fx") / "assets" / BUNDLED[name])
