"""MambaVision (Hatamizadeh & Kautz, NVlabs) in a form torch.fx can trace, with NVlabs' state-dict layout.

Keys, shapes and registration order are those of ``mambavision.models.mamba_vision.MambaVision``
(pip ``mambavision``), so its released checkpoints load strictly and its outputs are reproduced.
The differences are in how forward passes are written, not in what they compute:

* the mixer's two depthwise convolutions ``conv1d_x`` / ``conv1d_z`` are called as modules
  (``nn.Conv1d(padding="same", bias=False)``: upstream builds them with ``bias=conv_bias // 2``,
  i.e. no bias, and calls their weights through ``F.conv1d(..., padding="same")``);
* the selective scan is one call of the ``ouromamba::selective_scan`` op per mixer. As upstream,
  ``dt_proj`` is applied with its bias *and* the bias is passed to the scan as ``delta_bias``
  again (``delta = softplus(W dt + 2 b)``); the scan has no gate, its second branch
  ``silu(conv1d_z(z))`` is concatenated to the scan output before ``out_proj``;
* the stages' window padding and partition are written with shape arithmetic instead of Python
  branches (padding by zero is a no-op), and the batch size is carried explicitly so that batch 0
  works;
* attention uses ``F.scaled_dot_product_attention`` as upstream, with dropout only in training.

Child names per role: ``patch_embed.conv_down.{0,3}`` (stem convs, each followed by BatchNorm),
``levels.{0,1}.blocks.{j}.conv1/conv2`` (conv stages, each followed by BatchNorm),
``levels.{i}.downsample.reduction.0`` (stride-2 conv), and in the hybrid stages ``levels.{2,3}``:
``blocks.{j}.mixer.{in_proj, conv1d_x, conv1d_z, x_proj, dt_proj, out_proj}`` (Mamba blocks) or
``blocks.{j}.mixer.{qkv, proj}`` (attention blocks), ``blocks.{j}.mlp.{fc1, fc2}``; ``head``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_

from ouromamba_fx.errors import OuroMambaError
from ouromamba_fx.ops.scan import selective_scan

# The mixer configuration MambaVision's Block hard-codes.
MIXER_D_STATE, MIXER_D_CONV, MIXER_EXPAND = 8, 3, 1


@dataclass
class MambaVisionConfig:
    """Hyper-parameters of a :class:`MambaVision`; names follow NVlabs' constructor."""

    dim: int = 80
    in_dim: int = 32
    depths: tuple[int, ...] = (1, 3, 8, 4)
    window_size: tuple[int, ...] = (8, 8, 14, 7)
    mlp_ratio: float = 4.0
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    drop_path_rate: float = 0.2
    in_chans: int = 3
    num_classes: int = 1000
    qkv_bias: bool = True
    qk_norm: bool = False  # upstream's ``qk_scale`` argument, passed on as the attention's qk_norm
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    layer_scale: float | None = None
    layer_scale_conv: float | None = None
    img_size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.depths, self.window_size = tuple(self.depths), tuple(self.window_size)
        self.num_heads, self.mean, self.std = tuple(self.num_heads), tuple(self.mean), tuple(self.std)
        if len(self.depths) != 4 or len(self.window_size) != 4 or len(self.num_heads) != 4:
            raise ValueError("MambaVisionConfig: depths, window_size and num_heads need 4 values "
                             "(two conv stages, two hybrid stages)")
        if min(self.depths) < 1 or min(self.window_size) < 1 or min(self.num_heads) < 1:
            raise ValueError("MambaVisionConfig: depths, window_size and num_heads must be >= 1")
        for i in (2, 3):
            if (self.dim * 2 ** i) % self.num_heads[i]:
                raise ValueError(f"MambaVisionConfig: stage {i} width {self.dim * 2 ** i} is not "
                                 f"divisible by num_heads[{i}]={self.num_heads[i]}")
        if self.dim < 2 or self.in_dim < 1 or self.num_classes < 0:
            raise ValueError("MambaVisionConfig: dim >= 2, in_dim >= 1, num_classes >= 0 required")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"MambaVisionConfig: mean and std need {self.in_chans} values each")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_features(self) -> int:
        return self.dim * 2 ** (len(self.depths) - 1)


def transformer_blocks(depth: int) -> range:
    """Indices of a hybrid stage's attention blocks (the rest are Mamba blocks): the second half,
    the middle block counted as Mamba when ``depth`` is odd (NVlabs' rule)."""
    return range(depth // 2 + 1, depth) if depth % 2 else range(depth // 2, depth)


class MambaVisionMixer(nn.Module):
    """MambaVision's mixer: scan over half the channels, the other half as a concatenated branch.

    ``in_proj`` (C -> d_inner), split into x and z of ``d_inner/2`` channels each; both go through
    a non-causal depthwise conv (``padding="same"``) and SiLU; x is scanned (no gate, ``dt_proj``
    bias counted twice, see the module docstring); ``out_proj(cat([scan(x), z]))``.
    Input and output ``(batch, L, d_model)``.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        if self.d_inner % 2:
            raise ValueError(f"MambaVisionMixer: d_inner {self.d_inner} must be even")
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        half = self.d_inner // 2
        # Registration order = NVlabs' (state-dict order): in_proj, x_proj, dt_proj, A_log, D,
        # out_proj, conv1d_x, conv1d_z.
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=bias)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        with torch.no_grad():  # Mamba's dt initialisation (MambaVision's model init overwrites it)
            std = self.dt_rank ** -0.5
            self.dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(torch.rand(half) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(half, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        # Upstream passes bias=conv_bias // 2 (0 for True): the convs have no bias.
        conv_has_bias = bool(int(conv_bias) // 2)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, groups=half, padding="same", bias=conv_has_bias)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, groups=half, padding="same", bias=conv_has_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d_x(x))
        z = F.silu(self.conv1d_z(z))
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)  # bias included once here ...
        a = -torch.exp(self.A_log.float())
        if self._gen_record is not None:  # OuroMamba-Gen recording hook (see below)
            y = self._scan_recorded(x, delta, a, b, c)
        else:
            y = selective_scan(x, delta, a, b.transpose(1, 2), c.transpose(1, 2), self.D.float(), None,
                               self.dt_proj.bias.float(), True)  # ... and once more as delta_bias
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))

    # --- OuroMamba-Gen recording hook (ouromamba_fx.gen) ----------------------------------------
    # ``_gen_record`` is None except inside ``ouromamba_fx.gen.record_scan``. Then the scan runs
    # without D to get the raw readout ``yhat_t = C_t . h_t``; ``(yhat, softplus(delta + bias))``
    # is stored under ``"fwd"`` and the window's grid under ``"grid"``: the hybrid stages scan
    # each window's ws x ws tokens (row-major) as one sequence, so the neighbourhood enrichment and
    # the contrast run within each window (``L`` not a square: a 1 x L grid). Returns
    # ``yhat + D*u``, the normal path's output.
    _gen_record: dict | None = None

    def _scan_recorded(self, x, delta, a, b, c) -> torch.Tensor:
        step = F.softplus(delta + self.dt_proj.bias.float()[:, None])
        yhat = selective_scan(x, step, a, b.transpose(1, 2), c.transpose(1, 2), None, None, None, False)
        length = x.shape[-1]
        side = math.isqrt(length)
        self._gen_record["fwd"] = (yhat, step)
        self._gen_record["grid"] = (side, side) if side * side == length else (1, length)
        return yhat + self.D.float()[:, None] * x.float()


class Attention(nn.Module):
    """Multi-head self-attention (timm ViT style): ``qkv`` linear, SDPA, ``proj`` linear."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Hybrid-stage block: ``x + g1 * mixer(norm1(x))``, ``x + g2 * mlp(norm2(x))``; the mixer is
    a :class:`MambaVisionMixer` or an :class:`Attention`; ``g1``/``g2`` are layer-scale parameters
    ``gamma_1``/``gamma_2`` when ``layer_scale`` is set, else absent (upstream multiplies by 1)."""

    def __init__(self, dim: int, num_heads: int, attention: bool, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, qk_norm: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention:
            self.mixer = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                   attn_drop=attn_drop, proj_drop=drop)
        else:
            self.mixer = MambaVisionMixer(dim, d_state=MIXER_D_STATE, d_conv=MIXER_D_CONV,
                                          expand=MIXER_EXPAND)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_scale:
            x = x + self.drop_path(self.gamma_1 * self.mixer(self.norm1(x)))
            return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvBlock(nn.Module):
    """Conv-stage residual block: conv3x3 -> BN -> GELU(tanh) -> conv3x3 -> BN [-> * gamma] + x."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None,
                 kernel_size: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=kernel_size, stride=1, padding=1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=kernel_size, stride=1, padding=1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.layer_scale:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)


class Downsample(nn.Module):
    """Stride-2 3x3 conv doubling the width (``reduction.0``, no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(x)


class PatchEmbed(nn.Module):
    """Stem: two stride-2 3x3 convs with BatchNorm and ReLU (``conv_down.{0..5}``), /4 overall."""

    def __init__(self, in_chans: int = 3, in_dim: int = 64, dim: int = 96) -> None:
        super().__init__()
        self.proj = nn.Identity()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(in_dim, eps=1e-4), nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False), nn.BatchNorm2d(dim, eps=1e-4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(self.proj(x))


def window_partition(x: torch.Tensor, ws: int, b, c, h, w) -> torch.Tensor:
    """``(b, c, h, w)`` -> ``(b * h/ws * w/ws, ws*ws, c)``: windows in row-major order, tokens
    row-major inside each window (h and w multiples of ws)."""
    x = x.view(b, c, h // ws, ws, w // ws, ws)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b * (h // ws) * (w // ws), ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, b, c, h, w) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(b * nW, ws*ws, c)`` -> ``(b, c, h, w)``."""
    x = windows.reshape(b, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class MambaVisionLayer(nn.Module):
    """One stage: conv blocks (``conv=True``), or hybrid blocks applied to windows of
    ``window_size`` (the feature map zero-padded right/bottom to a multiple of it, the padding
    cropped afterwards; padded tokens take part in the scan and attention, as upstream);
    then the optional :class:`Downsample`."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, conv: bool,
                 downsample: bool, mlp_ratio: float, qkv_bias: bool, qk_norm: bool, drop: float,
                 attn_drop: float, drop_path: list[float], layer_scale: float | None,
                 layer_scale_conv: float | None) -> None:
        super().__init__()
        self.conv = conv
        self.transformer_block = not conv
        if conv:
            self.blocks = nn.ModuleList(ConvBlock(dim, drop_path=drop_path[i], layer_scale=layer_scale_conv)
                                        for i in range(depth))
        else:
            attn = transformer_blocks(depth)
            self.blocks = nn.ModuleList(
                Block(dim, num_heads, attention=i in attn, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      qk_norm=qk_norm, drop=drop, attn_drop=attn_drop, drop_path=drop_path[i],
                      layer_scale=layer_scale)
                for i in range(depth))
        self.downsample = Downsample(dim) if downsample else None
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transformer_block:
            ws = self.window_size
            b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
            pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
            x = F.pad(x, (0, pad_r, 0, pad_b))
            hp, wp = h + pad_b, w + pad_r
            x = window_partition(x, ws, b, c, hp, wp)
            for blk in self.blocks:
                x = blk(x)
            x = window_reverse(x, ws, b, c, hp, wp)[:, :, :h, :w]
        else:
            for blk in self.blocks:
                x = blk(x)
        if self.downsample is None:
            return x
        return self.downsample(x)


class MambaVision(nn.Module):
    """MambaVision classifier, NVlabs state-dict compatible.

    Example:
        >>> cfg = MambaVisionConfig(dim=16, in_dim=8, depths=(1, 1, 2, 2), window_size=(2, 2, 2, 1),
        ...                         num_heads=(1, 1, 2, 2), num_classes=10, img_size=32)
        >>> MambaVision(cfg)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, cfg: MambaVisionConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = cfg or MambaVisionConfig(**kwargs)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.patch_embed = PatchEmbed(in_chans=cfg.in_chans, in_dim=cfg.in_dim, dim=cfg.dim)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        self.levels = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            self.levels.append(MambaVisionLayer(
                dim=cfg.dim * 2 ** i, depth=depth, num_heads=cfg.num_heads[i],
                window_size=cfg.window_size[i], conv=i < 2, downsample=i < 3,
                mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, drop=cfg.drop_rate,
                attn_drop=cfg.attn_drop_rate, drop_path=dpr[sum(cfg.depths[:i]):sum(cfg.depths[:i + 1])],
                layer_scale=cfg.layer_scale, layer_scale_conv=cfg.layer_scale_conv))
        self.norm = nn.BatchNorm2d(cfg.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cfg.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {
            "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size), "mean": cfg.mean,
            "std": cfg.std, "crop_pct": cfg.crop_pct, "interpolation": "bicubic",
            "num_classes": cfg.num_classes,
        }
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # NVlabs' initialisation (it re-initialises every nn.Linear, the mixers' dt_proj included).
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @staticmethod
    def largest_activation(cfg: MambaVisionConfig) -> int:
        """Elements of the largest tensor one image's forward pass makes (an upper bound: the
        stem's output, a hybrid stage's MLP hidden layer or its scan states, with padding)."""
        side = -(-cfg.img_size // 4)
        sizes = [cfg.in_dim * (-(-cfg.img_size // 2)) ** 2, cfg.dim * side ** 2]
        for i in (2, 3):
            s = -(-side // 2 ** i)
            s = -(-s // cfg.window_size[i]) * cfg.window_size[i]
            width = cfg.dim * 2 ** i
            sizes += [s * s * int(width * cfg.mlp_ratio), s * s * width // 2 * MIXER_D_STATE]
        return max(sizes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return torch.flatten(self.avgpool(self.norm(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------
# Canonicalisation of NVlabs' objects

def _is_upstream(module: nn.Module, class_name: str) -> bool:
    cls = type(module)
    return cls.__name__ == class_name and not cls.__module__.startswith("ouromamba_fx.")


def is_upstream_model(module: nn.Module) -> bool:
    """True for NVlabs' ``MambaVision`` (pip ``mambavision`` or a copy of its file, e.g. the
    Hugging Face remote code), not for this package's class."""
    return (_is_upstream(module, "MambaVision") and hasattr(module, "levels")
            and hasattr(getattr(module, "patch_embed", None), "conv_down"))


def is_upstream_mixer(module: nn.Module) -> bool:
    return _is_upstream(module, "MambaVisionMixer") and hasattr(module, "conv1d_x")


def _refuse(what: str, why: str) -> OuroMambaError:
    return OuroMambaError(f"{what}: cannot be rebuilt as ouromamba_fx's MambaVision: {why}")


def mixer_from_upstream(module: nn.Module) -> MambaVisionMixer:
    """A :class:`MambaVisionMixer` holding ``module``'s own sub-modules and parameters (shared)."""
    what = f"{type(module).__module__}.{type(module).__qualname__}"
    for conv in (module.conv1d_x, module.conv1d_z):
        if conv.stride != (1,) or conv.dilation != (1,) or conv.groups != conv.in_channels:
            raise _refuse(what, f"{conv} is not a depthwise stride-1 conv")
    with torch.device("meta"):
        out = MambaVisionMixer(module.d_model, d_state=module.d_state, d_conv=module.d_conv,
                               expand=module.expand, dt_rank=module.dt_rank,
                               bias=module.in_proj.bias is not None)
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj", "A_log", "D"):
        setattr(out, name, getattr(module, name))
    # Upstream keeps plain nn.Conv1d modules and applies padding="same" itself: ours carry it.
    for name in ("conv1d_x", "conv1d_z"):
        conv = getattr(module, name)
        mine = nn.Conv1d(conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups,
                         padding="same", bias=conv.bias is not None, device="meta")
        mine.weight = conv.weight
        if conv.bias is not None:
            mine.bias = conv.bias
        setattr(out, name, mine)
    return out.train(module.training)


def config_from_upstream(model: nn.Module) -> MambaVisionConfig:
    """The :class:`MambaVisionConfig` of an NVlabs ``MambaVision`` object (read from its modules)."""
    what = f"{type(model).__module__}.{type(model).__qualname__}"
    conv_down = model.patch_embed.conv_down
    levels = list(model.levels)
    if len(levels) != 4:
        raise _refuse(what, f"{len(levels)} stages (expected 4)")
    depths = tuple(len(level.blocks) for level in levels)
    heads, mlp_ratio, qkv_bias, qk_norm, layer_scale = [], None, True, False, None
    drop = attn_drop = 0.0
    for i, level in enumerate(levels):
        if bool(level.conv) != (i < 2) or (level.downsample is None) != (i == 3):
            raise _refuse(what, f"stage {i} is not laid out as MambaVision's (conv stages 0-1, "
                                f"downsampling after stages 0-2)")
        h = None
        for j, blk in enumerate(level.blocks):
            if i < 2:
                continue
            is_attn = hasattr(blk.mixer, "qkv")
            if is_attn != (j in transformer_blocks(depths[i])):
                raise _refuse(what, f"stage {i} block {j} is {type(blk.mixer).__name__}, which "
                                    f"does not follow MambaVision's attention/Mamba split")
            mixer = blk.mixer
            if is_attn:
                h = mixer.num_heads
                qkv_bias = mixer.qkv.bias is not None
                qk_norm = not isinstance(mixer.q_norm, nn.Identity)
                attn_drop = float(mixer.attn_drop.p)
            elif (mixer.d_state, mixer.d_conv, mixer.expand) != (MIXER_D_STATE, MIXER_D_CONV, MIXER_EXPAND):
                raise _refuse(what, f"stage {i} block {j} mixer has d_state/d_conv/expand "
                                    f"{(mixer.d_state, mixer.d_conv, mixer.expand)}, MambaVision uses "
                                    f"{(MIXER_D_STATE, MIXER_D_CONV, MIXER_EXPAND)}")
            mlp_ratio = blk.mlp.fc1.out_features / blk.mlp.fc1.in_features
            drop = float(blk.mlp.drop1.p)
            if isinstance(getattr(blk, "gamma_1", None), nn.Parameter):
                layer_scale = 1e-5  # only the initial value; the loaded parameters replace it
        heads.append(h or 1)  # a stage without attention blocks: its head count is never used
    conv_gamma = getattr(levels[0].blocks[0], "gamma", None)
    head = model.head
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    extra = {k: tuple(pcfg[k]) for k in ("mean", "std") if k in pcfg}
    if "crop_pct" in pcfg:
        extra["crop_pct"] = float(pcfg["crop_pct"])
    if "input_size" in pcfg:
        extra["img_size"] = int(pcfg["input_size"][-1])
    return MambaVisionConfig(
        dim=conv_down[3].out_channels, in_dim=conv_down[0].out_channels,
        in_chans=conv_down[0].in_channels, depths=depths,
        window_size=tuple(int(level.window_size) for level in levels),
        mlp_ratio=mlp_ratio if mlp_ratio is not None else 4.0, num_heads=tuple(heads),
        drop_path_rate=0.0, num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
        qkv_bias=qkv_bias, qk_norm=qk_norm, drop_rate=drop, attn_drop_rate=attn_drop,
        layer_scale=layer_scale,
        layer_scale_conv=1e-5 if isinstance(conv_gamma, nn.Parameter) else None, **extra)


def from_upstream(model: nn.Module) -> MambaVision:
    """This package's :class:`MambaVision` with the parameters and buffers of NVlabs' ``model``
    (the same storage: nothing is copied), its drop-path modules and its train/eval mode."""
    cfg = config_from_upstream(model)
    with torch.device("meta"):
        out = MambaVision(cfg)
    out.load_state_dict(model.state_dict(), strict=True, assign=True)
    for mine, theirs in zip(out.levels, model.levels):
        for b_mine, b_theirs in zip(mine.blocks, theirs.blocks):
            b_mine.drop_path = b_theirs.drop_path
    return out.train(model.training)
