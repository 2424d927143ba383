"""VMamba (Liu et al., MzeroMiko/VMamba) v0 and v2 in a form torch.fx can trace, with the released
checkpoints' state-dict layout.

State-dict keys, shapes and order are those of ``classification/models/vmamba.py`` (the file the
released classification checkpoints were trained with): ``VSSM`` with ``patch_embed``,
``layers.{i}.blocks.{j}.{norm, op, norm2, mlp}``, ``layers.{i}.downsample``, ``classifier``.
Two SS2D forms are covered:

* v0 ("vanilla", ``forward_type="v0"``): channel-last ``(B, H, W, C)``, ``nn.Linear`` projections,
  d_state 16, ``z`` gate (``out_norm`` then ``* silu(z)``), PatchMerging2D downsampling, no MLP;
* v2 (``forward_type="v05_noz"`` in every released v2 config; ``v01``-``v05``, ``v3`` and the
  ``_noz``, ``_nozact``, ``_oact``, ``_no32``, ``_onnone`` postfixes are the same weights and are
  accepted): channel-first ``(B, C, H, W)`` with ``Linear2d`` (a 1x1 conv that stores an
  ``nn.Linear`` weight) and ``LayerNorm2d``, d_state 1, conv stem, strided-conv downsampling, MLP.

How SS2D is written here (what it computes is upstream's):

* The four scan directions are separate: ``k = 0`` ``hw`` (row-major, index ``h*W + w``),
  ``k = 1`` ``wh`` (column-major, ``w*H + h``), ``k = 2`` ``hw_rev`` and ``k = 3`` ``wh_rev``
  (the first two reversed), listed in :data:`DIRECTIONS`. Direction ``k`` has its own
  ``x_proj[k]`` (``nn.Linear(d_inner, dt_rank + 2 d_state, bias=False)``) and ``dt_projs[k]``
  (``nn.Linear(dt_rank, d_inner)``, its bias being upstream's ``dt_projs_bias[k]``, added here
  instead of as the scan's ``delta_bias``: the same sum), and one call of the
  ``ouromamba::selective_scan`` op over ``d_inner`` channels, with ``A = -exp(A_logs[k*E:(k+1)*E])``
  and ``D = Ds[k*E:(k+1)*E]``. Upstream's single grouped call over ``4 * d_inner`` channels
  (B/C grouped by direction) computes the same per channel.
* Cross-merge: every output is put back in row-major order (``hw_rev``: flip; ``wh``: transpose
  the column-major grid; ``wh_rev``: both) and the four are summed (in upstream's order per form).
* The state dict is upstream's: a state-dict hook stacks the per-direction weights into
  ``x_proj_weight (4, dt_rank + 2N, d_inner)``, ``dt_projs_weight (4, d_inner, dt_rank)`` and
  ``dt_projs_bias (4, d_inner)``; a load hook splits them again.
* Odd-size padding in PatchMerging2D is written with shape arithmetic (padding by zero is a no-op).

Child names per role (inside ``layers.{i}.blocks.{j}``): ``op.in_proj``, ``op.conv2d`` (depthwise
3x3), ``op.x_proj.{k}``, ``op.dt_projs.{k}``, ``op.out_norm`` (before the gate / out_proj),
``op.out_proj``, ``mlp.fc1`` / ``mlp.fc2`` (v2); ``layers.{i}.downsample.reduction`` (v0 linear) or
``layers.{i}.downsample.1`` (v2 conv); ``patch_embed.0`` (and ``.5`` in v2); ``classifier.head``.
In channel-first models the linears are :class:`Linear2d` (channel axis 1).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from ouromamba_fx.errors import OuroMambaError
from ouromamba_fx.ops.scan import selective_scan

#: Scan directions of SS2D, in upstream's order k = 0..3 (the index of x_proj / dt_projs and of the
#: direction's block of d_inner channels in A_logs / Ds).
DIRECTIONS = ("hw", "wh", "hw_rev", "wh_rev")

_ACTS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
_V2_BASES = ("v01", "v02", "v03", "v04", "v05", "v3")  # the same maths (einsum or grouped conv1d)
_OUT_NORMS = {"_onnone": "none", "_ondwconv3": None, "_oncnorm": None, "_onsoftmax": None,
              "_onsigmoid": None}


class Linear2d(nn.Linear):
    """``nn.Linear`` over the channel axis (1) of an NCHW tensor, run as a 1x1 convolution.

    Same parameters and state-dict entries as ``nn.Linear`` (weight ``(out, in)``); a checkpoint
    weight of shape ``(out, in, 1, 1)`` is accepted too (as upstream's ``Linear2d``).
    """

    channel_axis = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dim() == 4 and w.shape[2:] == (1, 1):
            state_dict[prefix + "weight"] = w.reshape(w.shape[:2])
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis (1) of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """``x.permute(*dims)`` (no parameters; keeps upstream's Sequential indices)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


@dataclass(frozen=True)
class SS2DForm:
    """What a ``forward_type`` string means (upstream's postfix grammar)."""

    version: str  # "v0" or "v2"
    gate: bool  # z branch: y = out_norm(core(x)) * act(z)
    gate_act: bool  # act(z) (else z as is: "_nozact")
    out_act: bool  # GELU after out_norm ("_oact")
    out_norm: str  # "ln" or "none"


def parse_forward_type(forward_type: str) -> SS2DForm:
    """Parse an SS2D ``forward_type``; raises ``ValueError`` for the ones not supported here."""
    if forward_type in ("v0", "v0seq"):
        return SS2DForm("v0", gate=True, gate_act=True, out_act=False, out_norm="ln")
    ft = forward_type
    flags = {}
    for tag in ("_no32", "_oact", "_noz", "_nozact"):  # upstream strips them in this order
        flags[tag] = ft.endswith(tag)
        ft = ft[: -len(tag)] if flags[tag] else ft
    out_norm = "ln"
    for tag, kind in _OUT_NORMS.items():
        if ft.endswith(tag):
            if kind is None:
                raise ValueError(f"SS2D forward_type {forward_type!r}: out-norm {tag!r} is not "
                                 f"supported by ouromamba_fx (supported: LayerNorm, '_onnone')")
            out_norm, ft = kind, ft[: -len(tag)]
            break
    if ft not in _V2_BASES:
        raise ValueError(f"SS2D forward_type {forward_type!r} is not supported by ouromamba_fx: "
                         f"supported are 'v0', 'v0seq' and {', '.join(_V2_BASES)} with the "
                         f"postfixes _onnone, _nozact, _noz, _oact, _no32 (cross-2D scan)")
    return SS2DForm("v2", gate=not flags["_noz"], gate_act=not flags["_nozact"],
                    out_act=flags["_oact"], out_norm=out_norm)


class SS2D(nn.Module):
    """2-D selective scan (VMamba): in_proj, depthwise conv, four directional scans, cross-merge,
    out_norm, [gate], out_proj. Input and output ``(B, H, W, C)`` (channel-last) or
    ``(B, C, H, W)`` (``channel_first``)."""

    def __init__(self, d_model: int = 96, d_state: int = 16, ssm_ratio: float = 2.0,
                 dt_rank: int | str = "auto", act_layer: str = "silu", d_conv: int = 3,
                 conv_bias: bool = True, dropout: float = 0.0, bias: bool = False,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 initialize: str = "v0", forward_type: str = "v2", channel_first: bool = False) -> None:
        super().__init__()
        form = parse_forward_type(forward_type)
        if form.version == "v0":
            if channel_first:
                raise ValueError("SS2D: forward_type v0 is channel-last only (as upstream)")
            # Upstream's v0 ignores these arguments and uses constants.
            act_layer, d_conv, conv_bias, bias, initialize = "silu", 3, True, False, "v0"
        if initialize not in ("v0", "v1", "v2"):
            raise ValueError(f"SS2D: initialize must be 'v0', 'v1' or 'v2', got {initialize!r}")
        self.form, self.forward_type, self.channel_first = form, forward_type, channel_first
        self.k_group = len(DIRECTIONS)
        self.d_model, self.d_state = int(d_model), int(d_state)
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = int(math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank)
        K, E, R, N = self.k_group, self.d_inner, self.dt_rank, self.d_state
        Linear = Linear2d if channel_first else nn.Linear

        # Registration order gives upstream's state-dict order (v2 registers out_norm first).
        if form.version == "v2":
            self.out_norm = self._out_norm(form, E, channel_first)
        self.in_proj = Linear(self.d_model, 2 * E if form.gate else E, bias=bias)
        self.act = _ACTS[act_layer]()
        self.conv2d = (nn.Conv2d(E, E, d_conv, padding=(d_conv - 1) // 2, groups=E, bias=conv_bias)
                       if d_conv > 1 else None)
        self.x_proj = nn.ModuleList(nn.Linear(E, R + 2 * N, bias=False) for _ in range(K))
        self.dt_projs = nn.ModuleList(nn.Linear(R, E, bias=True) for _ in range(K))
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(K * E, 1))
        self.Ds = nn.Parameter(torch.ones(K * E))
        self._init_dt(initialize, dt_min, dt_max, dt_init_floor)
        if form.version == "v0":
            self.out_norm = nn.LayerNorm(E)
        self.out_act = nn.GELU() if form.out_act else nn.Identity()
        self.out_proj = Linear(E, self.d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
        self.register_state_dict_post_hook(_stack_directions)
        self.register_load_state_dict_pre_hook(_split_directions)

    @staticmethod
    def _out_norm(form: SS2DForm, d_inner: int, channel_first: bool) -> nn.Module:
        if form.out_norm == "none":
            return nn.Identity()
        return LayerNorm2d(d_inner) if channel_first else nn.LayerNorm(d_inner)

    def _init_dt(self, initialize: str, dt_min: float, dt_max: float, floor: float) -> None:
        # Upstream's three initialisations of dt_projs, A_logs and Ds (x_proj keeps nn.Linear's).
        E, R = self.d_inner, self.dt_rank
        with torch.no_grad():
            if initialize == "v0":
                for proj in self.dt_projs:
                    proj.weight.uniform_(-R ** -0.5, R ** -0.5)
                    dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min))
                                   + math.log(dt_min)).clamp(min=floor)
                    proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                return
            self.Ds.fill_(1.0)
            if initialize == "v1":
                self.A_logs.normal_()
                for proj in self.dt_projs:
                    proj.weight.normal_(std=0.1)
                    proj.bias.normal_(std=0.1)
            else:
                self.A_logs.zero_()
                for proj in self.dt_projs:
                    proj.weight.uniform_(0, 0.1)
                    proj.bias.uniform_(0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        form = self.form
        x = self.in_proj(x)
        if form.gate:
            x, z = x.chunk(2, dim=1 if self.channel_first else -1)
            if form.gate_act:
                z = self.act(z)
        if not self.channel_first:
            x = x.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            x = self.conv2d(x)
        y = self.cross_scan_merge(self.act(x))  # (B, E, H, W)
        if not self.channel_first:
            y = y.permute(0, 2, 3, 1)
        y = self.out_act(self.out_norm(y))
        if form.gate:
            y = y * z
        return self.dropout(self.out_proj(y))

    def cross_scan_merge(self, x: torch.Tensor) -> torch.Tensor:
        """The four directional scans of ``x (B, E, H, W)``, merged back to ``(B, E, H, W)``."""
        b, e, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        if self._gen_record is not None:  # OuroMamba-Gen recording hook (see scan)
            self._gen_record["grid"] = (int(h), int(w))
        x_hw = x.flatten(2)  # (B, E, L), index h*W + w
        x_wh = x.transpose(2, 3).flatten(2)  # index w*H + h
        y_hw = self.scan(x_hw, 0)
        y_wh = self.scan(x_wh, 1)
        y_hw_rev = self.scan(x_hw.flip(-1), 2)
        y_wh_rev = self.scan(x_wh.flip(-1), 3)
        if self.form.version == "v0":  # upstream forwardv0's order of the sum
            y = (y_hw + y_hw_rev.flip(-1) + _wh_to_hw(y_wh, b, e, h, w)
                 + _wh_to_hw(y_wh_rev.flip(-1), b, e, h, w))
        else:  # upstream cross_merge_fwd's order
            y = (y_hw + y_hw_rev.flip(-1)) + _wh_to_hw(y_wh + y_wh_rev.flip(-1), b, e, h, w)
        return y.view(b, e, h, w)

    def scan(self, u: torch.Tensor, k: int) -> torch.Tensor:
        """Direction ``k``'s selective scan of ``u (B, E, L)`` (already in that direction's order)."""
        E, R, N = self.d_inner, self.dt_rank, self.d_state
        x_dbl = self.x_proj[k](u.transpose(1, 2))  # (B, L, R + 2N)
        dt, b, c = torch.split(x_dbl, [R, N, N], dim=-1)
        delta = self.dt_projs[k](dt).transpose(1, 2)  # (B, E, L), upstream's delta_bias included
        a = -torch.exp(self.A_logs[k * E:(k + 1) * E].float())
        if self._gen_record is not None:
            return self._scan_recorded(u, delta, a, b, c, k)
        return selective_scan(u, delta, a, b.transpose(1, 2), c.transpose(1, 2),
                              self.Ds[k * E:(k + 1) * E].float(), None, None, True)

    # --- OuroMamba-Gen recording hook (ouromamba_fx.gen) ----------------------------------------
    # ``_gen_record`` is None except inside ``ouromamba_fx.gen.record_scan``. Then each direction's
    # scan runs without D to get the raw readout ``yhat_t = C_t . h_t``, stores ``(yhat,
    # softplus(delta))`` under the direction's name *in row-major token order* (the ``_rev``
    # directions flipped back, the column-major ones transposed back), and ``"grid"`` = (H, W),
    # so that the neighbourhood enrichment sees the 2-D grid of every direction; it returns
    # ``yhat + D*u``: the same output as the normal path, still differentiable.
    _gen_record: dict | None = None

    def _scan_recorded(self, u, delta, a, b, c, k: int) -> torch.Tensor:
        E = self.d_inner
        step = F.softplus(delta)
        yhat = selective_scan(u, step, a, b.transpose(1, 2), c.transpose(1, 2), None, None, None, False)
        h, w = self._gen_record["grid"]
        name = DIRECTIONS[k]
        ys, ss = (yhat.flip(-1), step.flip(-1)) if name.endswith("_rev") else (yhat, step)
        if name.startswith("wh"):
            ys, ss = (_wh_to_hw(t, t.shape[0], E, h, w) for t in (ys, ss))
        self._gen_record[name] = (ys, ss)
        return yhat + self.Ds[k * E:(k + 1) * E].float()[:, None] * u.float()


def _wh_to_hw(y: torch.Tensor, b, e, h, w) -> torch.Tensor:
    """A column-major sequence ``(B, E, L)`` (index ``w*H + h``) in row-major order."""
    return y.view(b, e, w, h).transpose(2, 3).reshape(b, e, h * w)


# The stacked (upstream) names of the per-direction parameters: key -> (ModuleList, attribute).
_STACKED = {"x_proj_weight": ("x_proj", "weight"), "dt_projs_weight": ("dt_projs", "weight"),
            "dt_projs_bias": ("dt_projs", "bias")}
# Upstream's state-dict order of an SS2D's own parameters (its sub-modules follow).
_OWN_ORDER = ("x_proj_weight", "A_logs", "Ds", "dt_projs_weight", "dt_projs_bias")


def _stack_directions(module: SS2D, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: per-direction weights -> upstream's stacked parameters, in its order."""
    mine = [k for k in state_dict if k.startswith(prefix)]
    entries = {k[len(prefix):]: state_dict.pop(k) for k in mine}
    for key, (lst, attr) in _STACKED.items():
        entries[key] = torch.stack([entries.pop(f"{lst}.{i}.{attr}") for i in range(module.k_group)])
    for key in _OWN_ORDER:
        state_dict[prefix + key] = entries.pop(key)
    for key, value in entries.items():
        state_dict[prefix + key] = value


def _split_directions(module: SS2D, state_dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: upstream's stacked parameters -> the per-direction modules."""
    for key, (lst, attr) in _STACKED.items():
        if prefix + key not in state_dict:
            continue  # reported as missing per direction by load_state_dict
        value = state_dict.pop(prefix + key)
        expected = (module.k_group, *getattr(getattr(module, lst)[0], attr).shape)
        if tuple(value.shape) != expected:
            error_msgs.append(f"size mismatch for {prefix}{key}: copying a param with shape "
                              f"{tuple(value.shape)} from checkpoint, the shape in current model is "
                              f"{expected}.")
            continue
        for i in range(module.k_group):
            state_dict[f"{prefix}{lst}.{i}.{attr}"] = value[i]


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout (``Linear2d`` when channel-first)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: str = "gelu",
                 drop: float = 0.0, channels_first: bool = False) -> None:
        super().__init__()
        Linear = Linear2d if channels_first else nn.Linear
        self.fc1 = Linear(in_features, hidden_features)
        self.act = _ACTS[act_layer]()
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchMerging2D(nn.Module):
    """v0 downsampling: 2x2 neighbourhoods concatenated (order (0,0), (1,0), (0,1), (1,1) as
    (row, col) offsets), LayerNorm(4C), ``reduction`` linear 4C -> 2C (no bias). Odd sizes are
    zero-padded at the bottom/right."""

    def __init__(self, dim: int, out_dim: int = -1, norm_layer: type = nn.LayerNorm,
                 channel_first: bool = False) -> None:
        super().__init__()
        Linear = Linear2d if channel_first else nn.Linear
        self.channel_first = channel_first
        self.reduction = Linear(4 * dim, 2 * dim if out_dim < 0 else out_dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_first:
            h, w = x.shape[2], x.shape[3]
            x = F.pad(x, (0, w % 2, 0, h % 2))
            x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2],
                           x[..., 1::2, 1::2]], 1)
        else:
            h, w = x.shape[1], x.shape[2]
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class VSSBlock(nn.Module):
    """``x + drop_path(op(norm(x)))`` then ``x + drop_path(mlp(norm2(x)))`` (either branch optional;
    ``post_norm`` applies the norms after the branches instead)."""

    def __init__(self, hidden_dim: int, drop_path: float, norm_layer: type, channel_first: bool,
                 ssm_kwargs: dict, mlp_ratio: float, mlp_act_layer: str, mlp_drop_rate: float,
                 post_norm: bool = False) -> None:
        super().__init__()
        self.ssm_branch = ssm_kwargs["ssm_ratio"] > 0
        self.mlp_branch = mlp_ratio > 0
        self.post_norm = post_norm
        if self.ssm_branch:
            self.norm = norm_layer(hidden_dim)
            self.op = SS2D(d_model=hidden_dim, channel_first=channel_first, **ssm_kwargs)
        self.drop_path = DropPath(drop_path)
        if self.mlp_branch:
            self.norm2 = norm_layer(hidden_dim)
            self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), mlp_act_layer, mlp_drop_rate,
                           channels_first=channel_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ssm_branch:
            if self.post_norm:
                x = x + self.drop_path(self.norm(self.op(x)))
            else:
                x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp_branch:
            if self.post_norm:
                x = x + self.drop_path(self.norm2(self.mlp(x)))
            else:
                x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


@dataclass
class VMambaConfig:
    """Hyper-parameters of a :class:`VSSM`; names follow upstream's ``VSSM`` constructor (``dims``
    may be one int, doubled per stage, or a list)."""

    depths: tuple[int, ...] = (2, 2, 9, 2)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    ssm_d_state: int = 16
    ssm_ratio: float = 2.0
    ssm_dt_rank: int | str = "auto"
    ssm_act_layer: str = "silu"
    ssm_conv: int = 3
    ssm_conv_bias: bool = True
    ssm_drop_rate: float = 0.0
    ssm_init: str = "v0"
    forward_type: str = "v0"
    mlp_ratio: float = 0.0
    mlp_act_layer: str = "gelu"
    mlp_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    patch_norm: bool = True
    norm_layer: str = "ln"
    downsample_version: str = "v1"
    patchembed_version: str = "v1"
    img_size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.dims, int):
            self.dims = tuple(self.dims * 2 ** i for i in range(len(self.depths)))
        self.dims, self.depths = tuple(self.dims), tuple(self.depths)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if not self.depths or len(self.dims) != len(self.depths) or min(self.depths) < 0:
            raise ValueError("VMambaConfig: depths (>= 0 each) and dims need the same, non-zero length")
        choices = {"norm_layer": ("ln", "ln2d", "bn"), "downsample_version": ("v1", "v2", "v3", "none"),
                   "patchembed_version": ("v1", "v2"), "ssm_act_layer": tuple(_ACTS),
                   "mlp_act_layer": tuple(_ACTS)}
        for name, allowed in choices.items():
            if getattr(self, name).lower() not in allowed:
                raise ValueError(f"VMambaConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        form = parse_forward_type(self.forward_type)
        if form.version == "v0" and self.channel_first:
            raise ValueError("VMambaConfig: forward_type v0 needs norm_layer 'ln' (channel-last)")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"VMambaConfig: mean and std need {self.in_chans} values each")

    @property
    def channel_first(self) -> bool:
        return self.norm_layer.lower() in ("ln2d", "bn")

    def to_dict(self) -> dict:
        return asdict(self)


class VSSM(nn.Module):
    """VMamba classifier (v0 or v2 by ``forward_type``), MzeroMiko/VMamba state-dict compatible.

    Example:
        >>> cfg = VMambaConfig(depths=(1, 1), dims=(16, 32), num_classes=10, img_size=32)
        >>> VSSM(cfg)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, cfg: VMambaConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = cfg or VMambaConfig(**kwargs)
        self.cfg = cfg
        self.channel_first = cf = cfg.channel_first
        self.num_classes = cfg.num_classes
        self.dims = list(cfg.dims)
        self.num_features = cfg.dims[-1]
        norm_layer = {"ln": nn.LayerNorm, "ln2d": LayerNorm2d, "bn": nn.BatchNorm2d}[cfg.norm_layer.lower()]
        self.patch_embed = self._patch_embed(cfg, norm_layer)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        ssm_kwargs = dict(d_state=cfg.ssm_d_state, ssm_ratio=cfg.ssm_ratio, dt_rank=cfg.ssm_dt_rank,
                          act_layer=cfg.ssm_act_layer.lower(), d_conv=cfg.ssm_conv,
                          conv_bias=cfg.ssm_conv_bias, dropout=cfg.ssm_drop_rate,
                          initialize=cfg.ssm_init, forward_type=cfg.forward_type)
        self.layers = nn.ModuleList()
        for i, dim in enumerate(cfg.dims):
            last = i == len(cfg.dims) - 1
            blocks = nn.Sequential(*(
                VSSBlock(dim, dpr[sum(cfg.depths[:i]) + j], norm_layer, cf, ssm_kwargs, cfg.mlp_ratio,
                         cfg.mlp_act_layer.lower(), cfg.mlp_drop_rate)
                for j in range(cfg.depths[i])))
            downsample = nn.Identity() if last else self._downsample(cfg, dim, cfg.dims[i + 1], norm_layer)
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=downsample)))
        self.classifier = nn.Sequential(OrderedDict(
            norm=norm_layer(self.num_features),
            permute=nn.Identity() if cf else Permute(0, 3, 1, 2),
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            head=nn.Linear(self.num_features, cfg.num_classes)))
        self.pretrained_cfg = {
            "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size), "mean": cfg.mean,
            "std": cfg.std, "crop_pct": cfg.crop_pct, "interpolation": "bicubic",
            "num_classes": cfg.num_classes,
        }
        # Upstream's init re-draws every nn.Linear and LayerNorm; its x_proj / dt_projs are bare
        # parameters at that point, so they keep SS2D's own initialisation: so do ours.
        keep = {id(m) for op in self.modules() if isinstance(op, SS2D) for m in (*op.x_proj, *op.dt_projs)}
        for m in self.modules():
            if id(m) not in keep:
                self._init_weights(m)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @staticmethod
    def _patch_embed(cfg: VMambaConfig, norm_layer: type) -> nn.Sequential:
        cf, p, c, d = cfg.channel_first, cfg.patch_size, cfg.in_chans, cfg.dims[0]
        norm = (lambda n: norm_layer(n)) if cfg.patch_norm else (lambda n: nn.Identity())
        if cfg.patchembed_version == "v1":
            return nn.Sequential(nn.Conv2d(c, d, kernel_size=p, stride=p, bias=True),
                                 nn.Identity() if cf else Permute(0, 2, 3, 1), norm(d))
        stride, to_last = p // 2, not (cf or not cfg.patch_norm)
        return nn.Sequential(
            nn.Conv2d(c, d // 2, kernel_size=stride + 1, stride=stride, padding=1),
            Permute(0, 2, 3, 1) if to_last else nn.Identity(), norm(d // 2),
            Permute(0, 3, 1, 2) if to_last else nn.Identity(), nn.GELU(),
            nn.Conv2d(d // 2, d, kernel_size=stride + 1, stride=stride, padding=1),
            nn.Identity() if cf else Permute(0, 2, 3, 1), norm(d))

    @staticmethod
    def _downsample(cfg: VMambaConfig, dim: int, out_dim: int, norm_layer: type) -> nn.Module:
        cf, version = cfg.channel_first, cfg.downsample_version
        if version == "v1":
            return PatchMerging2D(dim, out_dim, norm_layer=norm_layer, channel_first=cf)
        if version == "none":
            return nn.Identity()
        kernel = dict(kernel_size=2, stride=2) if version == "v2" else dict(kernel_size=3, stride=2, padding=1)
        return nn.Sequential(nn.Identity() if cf else Permute(0, 3, 1, 2), nn.Conv2d(dim, out_dim, **kernel),
                             nn.Identity() if cf else Permute(0, 2, 3, 1), norm_layer(out_dim))

    @staticmethod
    def largest_activation(cfg: VMambaConfig) -> int:
        """Elements of the largest tensor one image's forward pass makes (an upper bound: the
        first stage's MLP hidden layer, in_proj output or scan states)."""
        side = -(-cfg.img_size // cfg.patch_size)
        d = cfg.dims[0]
        return side * side * max(int(d * max(cfg.mlp_ratio, 1)), int(2 * cfg.ssm_ratio * d),
                                 int(cfg.ssm_ratio * d) * max(cfg.ssm_d_state, 2), cfg.in_chans * 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


# ------------------------------------------------------------------------------------------------
# Canonicalisation of MzeroMiko/VMamba's objects

def _is_upstream(module: nn.Module, class_name: str) -> bool:
    cls = type(module)
    return cls.__name__ == class_name and not cls.__module__.startswith("ouromamba_fx.")


def is_upstream_model(module: nn.Module) -> bool:
    """True for MzeroMiko/VMamba's ``VSSM`` (classification file or the single-file version)."""
    return _is_upstream(module, "VSSM") and hasattr(module, "layers") and hasattr(module, "classifier")


def is_upstream_ss2d(module: nn.Module) -> bool:
    return _is_upstream(module, "SS2D") and hasattr(module, "A_logs")


def _what(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _act_name(module: nn.Module, what: str) -> str:
    for name, cls in _ACTS.items():
        if type(module) is cls:
            return name
    raise OuroMambaError(f"{what}: activation {type(module).__name__} is not one of {tuple(_ACTS)}")


def _method_name(fn) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(getattr(fn, "__func__", fn), "__name__", "")


def ss2d_kwargs_from_upstream(op: nn.Module) -> dict:
    """Constructor arguments of this package's :class:`SS2D` equivalent to upstream's ``op``
    (read from the instance: its bound ``forward`` / ``forward_core`` and its modules)."""
    what = _what(op)
    forward = op.__dict__.get("forward")
    kind = _method_name(forward) if forward is not None else ""
    if getattr(op, "x_proj_bias", None) is not None:
        raise OuroMambaError(f"{what}: x_proj_bias is not supported by ouromamba_fx's SS2D")
    kx, e = op.x_proj_weight.shape[0], op.x_proj_weight.shape[2]
    if kx != len(DIRECTIONS):
        raise OuroMambaError(f"{what}: {kx} scan directions; ouromamba_fx's SS2D has {len(DIRECTIONS)}")
    if kind == "forwardv0":
        forward_type, channel_first = "v0", False
    elif kind == "forwardv2":
        core = getattr(op, "forward_core", None)
        if _method_name(core) != "forward_corev2":
            raise OuroMambaError(f"{what}: its forward_type selects no known scan core")
        scan_mode = getattr(core, "keywords", {}).get("scan_mode", "cross2d")
        if scan_mode not in ("cross2d", 0):
            raise OuroMambaError(f"{what}: scan_mode {scan_mode!r} is not supported by ouromamba_fx "
                                 f"(only the cross-2D scan of four directions)")
        norm = op.out_norm
        if isinstance(norm, nn.Identity):
            postfix = "_onnone"
        elif isinstance(norm, nn.LayerNorm) and not isinstance(norm, nn.Sequential):
            postfix = ""
        else:
            raise OuroMambaError(f"{what}: out_norm {type(norm).__name__} is not supported by "
                                 f"ouromamba_fx (LayerNorm or none)")
        postfix += "_nozact" if op.disable_z_act else ""
        postfix += "_noz" if op.disable_z else ""
        postfix += "_oact" if op.oact else ""
        forward_type, channel_first = "v05" + postfix, bool(op.channel_first)
    else:
        raise OuroMambaError(f"{what}: forward {kind or '(none)'} is not supported by ouromamba_fx "
                             f"(v0 and the v2 family: v01-v05, v3)")
    conv = getattr(op, "conv2d", None)
    if conv is not None and (conv.groups != e or conv.stride != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1]
                             or conv.padding != ((conv.kernel_size[0] - 1) // 2,) * 2):
        raise OuroMambaError(f"{what}: conv2d {conv} is not the depthwise 'same' conv of SS2D")
    if (op.in_proj.bias is None) != (op.out_proj.bias is None):
        raise OuroMambaError(f"{what}: in_proj and out_proj disagree on bias")
    dropout = op.dropout.p if isinstance(op.dropout, nn.Dropout) else 0.0
    d_model = op.in_proj.in_features
    return dict(d_model=d_model, d_state=op.A_logs.shape[1], ssm_ratio=e / d_model,
                dt_rank=op.dt_projs_weight.shape[2], act_layer=_act_name(op.act, what),
                d_conv=conv.kernel_size[0] if conv is not None else 1,
                conv_bias=conv is not None and conv.bias is not None, dropout=dropout,
                bias=op.in_proj.bias is not None, forward_type=forward_type, channel_first=channel_first)


def _shared(module: nn.Module, source: nn.Module) -> nn.Module:
    """``module`` (built on the meta device) with ``source``'s tensors (shared storage)."""
    module.load_state_dict(source.state_dict(), strict=True, assign=True)
    return module.train(source.training)


def ss2d_from_upstream(op: nn.Module) -> SS2D:
    """This package's :class:`SS2D` with the parameters of upstream's ``op`` (shared storage)."""
    kwargs = ss2d_kwargs_from_upstream(op)
    with torch.device("meta"):
        out = SS2D(**kwargs)
    if out.d_inner != op.x_proj_weight.shape[2]:
        raise OuroMambaError(f"{_what(op)}: d_inner {op.x_proj_weight.shape[2]} is not a whole "
                             f"ssm_ratio of d_model {kwargs['d_model']}")
    return _shared(out, op)


def _norm_name(norm: nn.Module, what: str) -> str:
    if type(norm).__name__ == "LayerNorm2d":
        return "ln2d"
    if isinstance(norm, nn.BatchNorm2d):
        return "bn"
    if isinstance(norm, nn.LayerNorm):
        return "ln"
    raise OuroMambaError(f"{what}: norm layer {type(norm).__name__} is not supported")


def config_from_upstream(model: nn.Module) -> VMambaConfig:
    """The :class:`VMambaConfig` of upstream's ``VSSM`` object (read from its modules)."""
    what = _what(model)
    if getattr(model, "pos_embed", None) is not None:
        raise OuroMambaError(f"{what}: posembed=True is not supported by ouromamba_fx")
    pe = model.patch_embed
    if len(pe) == 3:
        patchembed, patch_size = "v1", pe[0].kernel_size[0]
    elif len(pe) == 8:
        patchembed, patch_size = "v2", pe[0].stride[0] * 2
    else:
        raise OuroMambaError(f"{what}: unknown patch embedding ({len(pe)} modules)")
    layers = list(model.layers)
    downsample = "v2"
    if len(layers) > 1:
        ds = layers[0].downsample
        if type(ds).__name__ == "PatchMerging2D":
            downsample = "v1"
        elif isinstance(ds, nn.Sequential) and isinstance(ds[1], nn.Conv2d):
            downsample = {2: "v2", 3: "v3"}.get(ds[1].kernel_size[0], "")
        elif ds is None or isinstance(ds, nn.Identity):
            downsample = "none"
        if not downsample:
            raise OuroMambaError(f"{what}: unknown downsampling {type(ds).__name__}")
    blocks = [blk for layer in layers for blk in layer.blocks]
    ssm, mlp, dt_ranks = {}, {"mlp_ratio": 0.0}, set()
    for blk in blocks:
        if getattr(blk, "post_norm", False):
            raise OuroMambaError(f"{what}: post_norm blocks are not supported by ouromamba_fx")
        if blk.ssm_branch:
            kw = ss2d_kwargs_from_upstream(blk.op)
            d_model, dt_rank = kw.pop("d_model"), kw.pop("dt_rank")
            dt_ranks.add("auto" if dt_rank == math.ceil(d_model / 16) else dt_rank)
            kw["ssm_ratio"] = round(kw["ssm_ratio"], 6)
            if (ssm and kw != ssm) or len(dt_ranks) > 1:
                raise OuroMambaError(f"{what}: its SS2D blocks differ ({ssm} vs {kw}, dt_rank "
                                     f"{sorted(map(str, dt_ranks))})")
            ssm = kw
        if blk.mlp_branch:
            if type(blk.mlp).__name__ != "Mlp":
                raise OuroMambaError(f"{what}: {type(blk.mlp).__name__} MLPs are not supported")
            fc1 = blk.mlp.fc1
            mlp = dict(mlp_ratio=round(fc1.out_features / fc1.in_features, 6),
                       mlp_act_layer=_act_name(blk.mlp.act, what), mlp_drop_rate=float(blk.mlp.drop.p))
    if not ssm:
        ssm = dict(ssm_ratio=0.0, forward_type="v05", channel_first=bool(model.channel_first))
    cfg = dict(
        depths=tuple(len(layer.blocks) for layer in layers), dims=tuple(model.dims),
        patch_size=patch_size, in_chans=pe[0].in_channels, num_classes=model.classifier.head.out_features,
        ssm_d_state=ssm.get("d_state", 1), ssm_ratio=ssm["ssm_ratio"], ssm_dt_rank=dt_ranks.pop() if dt_ranks else "auto",
        ssm_act_layer=ssm.get("act_layer", "silu"), ssm_conv=ssm.get("d_conv", 3),
        ssm_conv_bias=ssm.get("conv_bias", True), ssm_drop_rate=ssm.get("dropout", 0.0),
        forward_type=ssm["forward_type"], drop_path_rate=0.0,
        patch_norm=not isinstance(pe[2], nn.Identity),
        norm_layer=_norm_name(model.classifier.norm, what),
        downsample_version=downsample, patchembed_version=patchembed, **mlp)
    if ssm.get("bias"):
        raise OuroMambaError(f"{what}: SS2D projections with bias are not reachable from VSSM's config")
    if ssm["channel_first"] != (cfg["norm_layer"] in ("ln2d", "bn")):
        raise OuroMambaError(f"{what}: SS2D layout does not match the model's norm layer")
    return VMambaConfig(**cfg)


def from_upstream(model: nn.Module) -> VSSM:
    """This package's :class:`VSSM` with the parameters and buffers of upstream's ``model`` (the
    same storage: nothing is copied), its drop-path modules and its train/eval mode."""
    cfg = config_from_upstream(model)
    with torch.device("meta"):
        out = VSSM(cfg)
    _shared(out, model)
    for mine, theirs in zip(out.layers, model.layers):
        for b_mine, b_theirs in zip(mine.blocks, theirs.blocks):
            b_mine.drop_path = b_theirs.drop_path
    return out
