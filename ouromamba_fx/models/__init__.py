"""Vision Mamba models: hustvl/Vim-compatible implementation, loader and timm registrations."""

from ouromamba_fx.models.loader import Checkpoint, config_from_checkpoint, load, read_checkpoint
from ouromamba_fx.models.mixer import MambaMixer
from ouromamba_fx.models.catalog import CONFIGS, bundled_checkpoint
from ouromamba_fx.models.registry import create
from ouromamba_fx.models.vim import VimBlock, VimConfig, VisionMamba
from ouromamba_fx.models import families  # registers the MambaVision / VMamba / Mamba-stack timm names
from ouromamba_fx.models.families import canonicalize
from ouromamba_fx.models.mamba_blocks import CanonicalMamba, MambaStack, MambaStackConfig
from ouromamba_fx.models.mambavision import MambaVision, MambaVisionConfig
from ouromamba_fx.models.vmamba import VSSM, VMambaConfig


def reference_model():
    """The bundled reference Vim (CIFAR-10, 8 layers, d_model 128), loaded strictly, in eval mode."""
    return create("vim_cifar_d128_l8", pretrained=True)


__all__ = ["Checkpoint", "CONFIGS", "CanonicalMamba", "MambaMixer", "MambaStack", "MambaStackConfig",
           "MambaVision", "MambaVisionConfig", "VMambaConfig", "VSSM", "VimBlock", "VimConfig",
           "VisionMamba", "bundled_checkpoint", "canonicalize", "config_from_checkpoint", "create",
           "families", "load", "read_checkpoint", "reference_model"]
