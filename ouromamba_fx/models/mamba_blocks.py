"""mamba-ssm's ``Mamba`` block in the package's traceable form, and a small vision classifier of them.

:class:`CanonicalMamba` is :class:`~ouromamba_fx.models.mixer.MambaMixer` (whose parameter names
are mamba-ssm's) with mamba-ssm's call signature ``forward(hidden_states, inference_params=None)``,
so it can stand in for ``mamba_ssm.modules.mamba_simple.Mamba`` inside a user's model, e.g. in
mamba-ssm's ``Block``, which passes ``inference_params`` by keyword.
:func:`canonicalize_mamba` swaps every such ``Mamba`` in a model for one, sharing the parameters
(the same ``nn.Parameter`` and sub-module objects, so nothing is copied and the outputs are equal).

What is not carried over, on purpose: mamba-ssm's recurrent decoding (``inference_params``,
``step``, ``allocate_inference_cache``) is a language-model path; :class:`CanonicalMamba` refuses a
non-None ``inference_params`` instead of ignoring it. The fused CUDA path (``causal_conv1d`` +
``mamba_inner_fn``) computes the same function as the one written here.

:class:`MambaStack` is a minimal vision model of these blocks (patch embedding, pre-norm residual
``Mamba`` blocks, mean pooling, linear head); its state-dict keys are those of a stack of mamba-ssm
``Block(dim, Mamba, nn.Identity, nn.LayerNorm)`` modules (``layers.{i}.norm``,
``layers.{i}.mixer``) between a timm patch embedding and a head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.fx
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_

from ouromamba_fx.errors import OuroMambaError
from ouromamba_fx.models.mixer import DIRECTIONS, MambaMixer


class CanonicalMamba(MambaMixer):
    """:class:`MambaMixer` with mamba-ssm ``Mamba``'s ``forward(hidden_states, inference_params=None)``.

    Input and output ``(batch, L, d_model)``. ``inference_params`` must be None (no recurrent
    decoding); under ``torch.fx`` tracing it may be a placeholder and is then not used.
    """

    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        if inference_params is not None and not isinstance(inference_params, torch.fx.Proxy):
            raise OuroMambaError(
                f"{type(self).__name__}: inference_params (mamba-ssm's step-by-step decoding cache) "
                f"is not supported; call the block on the whole sequence with inference_params=None")
        return super().forward(hidden_states)


def is_upstream_mamba(module: nn.Module) -> bool:
    """True for mamba-ssm's ``Mamba`` (``mamba_ssm.modules.mamba_simple``, and forks that keep that
    module path, such as hustvl/Vim's bidirectional one)."""
    cls = type(module)
    return cls.__name__ == "Mamba" and cls.__module__.rsplit(".", 1)[-1] == "mamba_simple"


def mamba_from_upstream(module: nn.Module) -> CanonicalMamba:
    """A :class:`CanonicalMamba` holding ``module``'s own sub-modules and parameters.

    ``module`` is a mamba-ssm ``Mamba`` (unidirectional) or hustvl/Vim's fork with
    ``bimamba_type="v2"``. Raises :class:`OuroMambaError` naming the attribute for variants whose
    function differs (another activation, Vim's ``bimamba_type="v1"``, layer scale).
    """
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    act = getattr(module, "activation", "silu")
    bimamba_type = getattr(module, "bimamba_type", "none") or "none"
    problems = []
    if act != "silu":
        problems.append(f"activation={act!r} (only 'silu')")
    if bimamba_type not in ("none", "v2"):
        problems.append(f"bimamba_type={bimamba_type!r} (only 'none' and 'v2')")
    if getattr(module, "init_layer_scale", None) is not None:
        problems.append("init_layer_scale (a layer-scale gamma)")
    conv = module.conv1d
    d_inner, d_conv = module.d_inner, module.d_conv
    if (conv.kernel_size != (d_conv,) or conv.padding != (d_conv - 1,) or conv.groups != d_inner
            or conv.stride != (1,) or conv.dilation != (1,)):
        problems.append(f"conv1d {conv} is not the causal depthwise conv of width d_conv={d_conv}")
    if problems:
        raise OuroMambaError(f"{name}: cannot be rebuilt as ouromamba_fx's CanonicalMamba: "
                             + "; ".join(problems))
    bimamba = bimamba_type == "v2"
    with torch.device("meta"):  # every tensor is replaced by the upstream one below
        out = CanonicalMamba(module.d_model, d_state=module.d_state, d_conv=d_conv,
                             expand=module.expand, dt_rank=module.dt_rank, bimamba=bimamba,
                             divide_out=bool(getattr(module, "if_devide_out", True)),
                             conv_bias=conv.bias is not None, bias=module.in_proj.bias is not None)
    out.in_proj, out.out_proj = module.in_proj, module.out_proj
    for direction in ("fwd", "bwd") if bimamba else ("fwd",):
        for attr in DIRECTIONS[direction]:
            setattr(out, attr, getattr(module, attr))
    left = [n for n, t in [*out.named_parameters(), *out.named_buffers()] if t.is_meta]
    if left:
        raise OuroMambaError(f"{name}: parameters {left} were not found on the module")
    return out.train(module.training)


def canonicalize_mamba(model: nn.Module) -> nn.Module:
    """Swap every mamba-ssm ``Mamba`` inside ``model`` for a :class:`CanonicalMamba` sharing its
    parameters, in place. Returns ``model`` (or the replacement, if ``model`` itself is a ``Mamba``).

    Example:
        >>> from mamba_ssm.modules.mamba_simple import Mamba                  # doctest: +SKIP
        >>> stack = canonicalize_mamba(nn.Sequential(Mamba(64), Mamba(64)))   # doctest: +SKIP
    """
    if is_upstream_mamba(model):
        return mamba_from_upstream(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if is_upstream_mamba(child):
                setattr(parent, child_name, mamba_from_upstream(child))
    return model


# ------------------------------------------------------------------------------------------------
# A small vision classifier built of mamba-ssm blocks (the package's CIFAR model of this family)

@dataclass
class MambaStackConfig:
    """Hyper-parameters of a :class:`MambaStack`."""

    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 128
    depth: int = 8
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(embed_dim / 16)
    num_classes: int = 10
    norm_eps: float = 1e-5
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 1.0
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "d_state", "d_conv", "expand"):
            if getattr(self, name) < 1:
                raise ValueError(f"MambaStackConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 0 or self.num_classes < 0 or self.img_size % self.patch_size:
            raise ValueError("MambaStackConfig: depth >= 0, num_classes >= 0 and img_size a multiple "
                             "of patch_size are required")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"MambaStackConfig: mean and std need {self.in_chans} values each")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def to_dict(self) -> dict:
        return asdict(self)


class MambaStackBlock(nn.Module):
    """``x + mixer(norm(x))``: mamba-ssm's ``Block`` without fused add-norm and without MLP."""

    def __init__(self, cfg: MambaStackConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mixer = CanonicalMamba(cfg.embed_dim, d_state=cfg.d_state, d_conv=cfg.d_conv,
                                    expand=cfg.expand, dt_rank=cfg.dt_rank or "auto", bimamba=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class MambaStack(nn.Module):
    """Patch embedding + learned position embedding, ``depth`` unidirectional Mamba blocks over the
    row-major patch sequence, final LayerNorm, mean over tokens, linear head.

    Example:
        >>> m = MambaStack(MambaStackConfig(embed_dim=32, depth=2))
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, cfg: MambaStackConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = cfg or MambaStackConfig(**kwargs)
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, cfg.embed_dim))
        self.layers = nn.ModuleList(MambaStackBlock(cfg) for _ in range(cfg.depth))
        self.norm_f = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.pretrained_cfg = {
            "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size), "mean": cfg.mean,
            "std": cfg.std, "crop_pct": cfg.crop_pct, "interpolation": "bicubic",
            "num_classes": cfg.num_classes,
        }
        trunc_normal_(self.pos_embed, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @staticmethod
    def largest_activation(cfg: MambaStackConfig) -> int:
        """Elements of the largest tensor one image's forward pass makes (scan states)."""
        tokens = (cfg.img_size // cfg.patch_size) ** 2
        return tokens * cfg.expand * cfg.embed_dim * max(cfg.d_state, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
