"""Vision Mamba (Vim) with hustvl/Vim's state-dict layout, built on timm layers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, RmsNorm, trunc_normal_

from ouromamba_fx.models.mixer import MambaMixer

CLS_POSITIONS = ("middle", "head", "tail", "none")


@dataclass
class VimConfig:
    """Hyper-parameters of a Vision Mamba. Field names follow hustvl/Vim where it has one."""

    img_size: int = 224
    patch_size: int = 16
    stride: int | None = None  # None: same as patch_size
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None  # None: ceil(embed_dim / 16)
    in_chans: int = 3
    num_classes: int = 1000
    cls_position: str = "middle"  # middle (hustvl's use_middle_cls_token), head, tail, none (mean pool)
    bimamba: bool = True
    divide_out: bool = True
    norm_eps: float = 1e-5
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "embed_dim", "d_state", "expand", "d_conv", "in_chans"):
            if getattr(self, name) < 1:
                raise ValueError(f"VimConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stride", "dt_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"VimConfig.{name} must be None or >= 1, got {getattr(self, name)}")
        if self.depth < 0 or self.num_classes < 0 or not self.norm_eps > 0:
            raise ValueError("VimConfig: depth >= 0, num_classes >= 0 and norm_eps > 0 are required")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans or min(self.std) <= 0:
            raise ValueError(f"VimConfig: mean and std need {self.in_chans} values each (std > 0)")
        if self.cls_position not in CLS_POSITIONS:
            raise ValueError(f"VimConfig.cls_position must be one of {CLS_POSITIONS}, "
                             f"got {self.cls_position!r}")
        stride = self.stride or self.patch_size
        if self.img_size < self.patch_size or (self.img_size - self.patch_size) % stride:
            raise ValueError(f"VimConfig: img_size {self.img_size} is not covered by patches of "
                             f"{self.patch_size} with stride {stride}")
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"VimConfig: {len(self.classes)} class names for num_classes "
                             f"{self.num_classes}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def to_dict(self) -> dict:
        return asdict(self)


class VimBlock(nn.Module):
    """Pre-norm residual block ``x + mixer(norm(x))`` (hustvl's Block without fused add-norm)."""

    def __init__(self, cfg: VimConfig) -> None:
        super().__init__()
        self.norm = RmsNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mixer = MambaMixer(cfg.embed_dim, d_state=cfg.d_state, d_conv=cfg.d_conv,
                                expand=cfg.expand, dt_rank=cfg.dt_rank or "auto",
                                bimamba=cfg.bimamba, divide_out=cfg.divide_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class VisionMamba(nn.Module):
    """Vision Mamba classifier (Zhu et al. 2024), hustvl/Vim state-dict compatible.

    Example:
        >>> from ouromamba_fx.models import VimConfig, VisionMamba
        >>> m = VisionMamba(VimConfig(img_size=32, patch_size=4, embed_dim=32, depth=2, num_classes=10))
        >>> m(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, cfg: VimConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = cfg or VimConfig(**kwargs)
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        stride = cfg.stride or cfg.patch_size
        if stride != cfg.patch_size:  # hustvl's overlapping "stride8" variants
            self.patch_embed.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride)
            side = (cfg.img_size - cfg.patch_size) // stride + 1
            self.patch_embed.grid_size = (side, side)
            self.patch_embed.num_patches = side * side
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        # Where the class token sits in the token sequence (None: no class token, mean pooling).
        self.cls_index: int | None = {"middle": self.num_patches // 2, "head": 0,
                                      "tail": self.num_patches, "none": None}[cfg.cls_position]
        self.num_tokens = self.num_patches + (self.cls_index is not None)
        if self.cls_index is not None:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, cfg.embed_dim))
        self.layers = nn.ModuleList(VimBlock(cfg) for _ in range(cfg.depth))
        self.norm_f = RmsNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.pretrained_cfg = {
            "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size),
            "mean": cfg.mean, "std": cfg.std, "crop_pct": cfg.crop_pct,
            "interpolation": "bicubic", "num_classes": cfg.num_classes,
        }
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_index is not None:
            trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @staticmethod
    def largest_activation(cfg: VimConfig) -> int:
        """Elements of the largest tensor one image's forward pass makes (the scan's states
        when they are recorded for reparameterization: tokens x d_inner x d_state)."""
        stride = cfg.stride or cfg.patch_size
        tokens = ((cfg.img_size - cfg.patch_size) // stride + 1) ** 2 + 1
        return tokens * cfg.expand * cfg.embed_dim * max(cfg.d_state, cfg.in_chans * cfg.patch_size ** 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        i = self.cls_index
        if i is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat((x[:, :i], cls, x[:, i:]), dim=1)
        x = x + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        x = self.norm_f(x)
        return x[:, i] if i is not None else x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
