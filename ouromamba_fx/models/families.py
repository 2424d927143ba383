"""The vision Mamba families besides Vim: timm names, checkpoint loading, and canonicalisation of
upstream model objects.

    >>> import timm, ouromamba_fx
    >>> m = timm.create_model("mambavision_tiny")                               # random weights
    >>> m = timm.create_model("vmamba_v2_tiny_s2l5", checkpoint="vssm_tiny_0230_ckpt_epoch_262.pth")  # doctest: +SKIP
    >>> m = ouromamba_fx.models.canonicalize(upstream_model)                    # doctest: +SKIP

Families (``FAMILIES``): ``mambavision`` (NVlabs MambaVision), ``vmamba`` (MzeroMiko/VMamba v0 and
v2), ``mamba`` (a stack of mamba-ssm ``Mamba`` blocks, :class:`MambaStack`). Their timm names are
distinct from the upstream packages' own registrations (``mamba_vision_T``, ``vmamba_tiny_s2l5``),
so importing both never overwrites a registry entry.

Checkpoints are read without running pickled code: ``torch.load(weights_only=True)`` with two
additions to its allow-list, ``argparse.Namespace`` (timm's checkpoint saver, used by MambaVision)
and yacs' ``CfgNode`` loaded *as a plain ``OrderedDict``* (VMamba's training code pickles its
config into every checkpoint; yacs itself is neither needed nor imported). Anything else pickled in
the file is refused with a :class:`~ouromamba_fx.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
from collections import OrderedDict
from dataclasses import fields
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file
from timm.models import register_model

from ouromamba_fx.errors import CheckpointError
from ouromamba_fx.models import mambavision, vmamba
from ouromamba_fx.models.loader import Checkpoint, load_state_dict_strict
from ouromamba_fx.models.mamba_blocks import MambaStack, MambaStackConfig, canonicalize_mamba, is_upstream_mamba
from ouromamba_fx.models.mambavision import MambaVision, MambaVisionConfig
from ouromamba_fx.models.catalog import CIFAR_MEAN, CIFAR_STD
from ouromamba_fx.models.vmamba import VSSM, VMambaConfig

#: family -> (model class, config class)
FAMILIES: dict[str, tuple[type[nn.Module], type]] = {
    "mambavision": (MambaVision, MambaVisionConfig),
    "vmamba": (VSSM, VMambaConfig),
    "mamba": (MambaStack, MambaStackConfig),
}

_CIFAR = dict(img_size=32, num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD, crop_pct=1.0)


def _mv(dim, in_dim, depths, heads=(2, 4, 8, 16), dpr=0.2, layer_scale=None, crop_pct=1.0):
    return MambaVisionConfig(dim=dim, in_dim=in_dim, depths=depths, num_heads=heads,
                             window_size=(8, 8, 14, 7), drop_path_rate=dpr, layer_scale=layer_scale,
                             crop_pct=crop_pct)


_V0 = dict(ssm_d_state=16, ssm_ratio=2.0, ssm_conv=3, ssm_conv_bias=True, forward_type="v0",
           mlp_ratio=0.0, norm_layer="ln", downsample_version="v1", patchembed_version="v1")
_V2 = dict(ssm_d_state=1, ssm_conv=3, ssm_conv_bias=False, forward_type="v05_noz", mlp_ratio=4.0,
           norm_layer="ln2d", downsample_version="v3", patchembed_version="v2")

#: Published configurations (ImageNet-1K, 224 px) and the package's CIFAR-10 training configs.
CONFIGS: dict[str, tuple[str, object]] = {
    # NVlabs MambaVision-{T,T2,S,B,L,L2}-1K
    "mambavision_tiny": ("mambavision", _mv(80, 32, (1, 3, 8, 4))),
    "mambavision_tiny2": ("mambavision", _mv(80, 32, (1, 3, 11, 4), crop_pct=0.98)),
    "mambavision_small": ("mambavision", _mv(96, 64, (3, 3, 7, 5), crop_pct=0.93)),
    "mambavision_base": ("mambavision", _mv(128, 64, (3, 3, 10, 5), dpr=0.3, layer_scale=1e-5)),
    "mambavision_large": ("mambavision", _mv(196, 64, (3, 3, 10, 5), (4, 8, 16, 32), 0.3, 1e-5)),
    "mambavision_large2": ("mambavision", _mv(196, 64, (3, 3, 12, 5), (4, 8, 16, 32), 0.3, 1e-5)),
    # VMamba v0 ("Vanilla-VMamba-{T,S,B}")
    "vmamba_v0_tiny": ("vmamba", VMambaConfig(depths=(2, 2, 9, 2), dims=96, drop_path_rate=0.2, **_V0)),
    "vmamba_v0_small": ("vmamba", VMambaConfig(depths=(2, 2, 27, 2), dims=96, drop_path_rate=0.3, **_V0)),
    "vmamba_v0_base": ("vmamba", VMambaConfig(depths=(2, 2, 27, 2), dims=128, drop_path_rate=0.6, **_V0)),
    # VMamba v2 ("VMamba-{T,S,B}[s2l*]" and "[s1l*]")
    "vmamba_v2_tiny_s2l5": ("vmamba", VMambaConfig(depths=(2, 2, 5, 2), dims=96, ssm_ratio=2.0,
                                                   drop_path_rate=0.2, **_V2)),
    "vmamba_v2_small_s2l15": ("vmamba", VMambaConfig(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0,
                                                     drop_path_rate=0.3, **_V2)),
    "vmamba_v2_base_s2l15": ("vmamba", VMambaConfig(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0,
                                                    drop_path_rate=0.6, **_V2)),
    "vmamba_v2_tiny_s1l8": ("vmamba", VMambaConfig(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0,
                                                   drop_path_rate=0.2, **_V2)),
    "vmamba_v2_small_s1l20": ("vmamba", VMambaConfig(depths=(2, 2, 20, 2), dims=96, ssm_ratio=1.0,
                                                     drop_path_rate=0.3, **_V2)),
    "vmamba_v2_base_s1l20": ("vmamba", VMambaConfig(depths=(2, 2, 20, 2), dims=128, ssm_ratio=1.0,
                                                    drop_path_rate=0.5, **_V2)),
    # CIFAR-10 models of each family, trained by tools/train_cifar.py. MambaVision's stem and
    # three downsamplings divide the input by 32, so at 32 px its hybrid stages would see 2x2 and
    # 1x1 maps (scans of 4 and 1 tokens); it takes the images upsampled to 64 px instead (4x4 and
    # 2x2: scans of 16 and 4 tokens). The others take 32 px with 4x4 patches (an 8x8 grid).
    "mambavision_cifar": ("mambavision", MambaVisionConfig(
        dim=24, in_dim=16, depths=(1, 2, 4, 2), window_size=(8, 8, 4, 2), num_heads=(1, 2, 4, 8),
        mlp_ratio=4.0, drop_path_rate=0.1, **{**_CIFAR, "img_size": 64})),
    "vmamba_v0_cifar": ("vmamba", VMambaConfig(
        depths=(2, 4, 2), dims=(48, 96, 192), patch_size=4, drop_path_rate=0.1, **_V0, **_CIFAR)),
    "vmamba_v2_cifar": ("vmamba", VMambaConfig(
        depths=(2, 4, 2), dims=(48, 96, 192), patch_size=4, ssm_ratio=2.0, drop_path_rate=0.1,
        **_V2, **_CIFAR)),
    "mamba_stack_cifar": ("mamba", MambaStackConfig(embed_dim=128, depth=8, patch_size=4, **_CIFAR)),
}
_TIMM_KWARGS = {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}


def config_for(name: str):
    """``(family, config)`` of a registered name."""
    if name not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def bundled_checkpoint(name: str) -> str | None:
    """Path of ``assets/<name>.safetensors`` or ``.pt`` shipped with the package, if there is one."""
    for suffix in (".safetensors", ".pt"):
        path = resources.files("ouromamba_fx") / "assets" / f"{name}{suffix}"
        if path.is_file():
            return str(path)
    return None


def _with(cfg, overrides: dict):
    if not overrides:
        return cfg
    known = {f.name for f in fields(cfg)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"unknown {type(cfg).__name__} fields {bad}; known: {sorted(known)}")
    return type(cfg)(**{**cfg.to_dict(), **overrides})


def create(name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model of one of :data:`FAMILIES`; ``checkpoint`` loads weights strictly
    (upstream release layouts accepted, see :func:`load`)."""
    family, cfg = config_for(name)
    if pretrained and checkpoint is None:
        checkpoint = bundled_checkpoint(name)
        if checkpoint is None:
            raise RuntimeError(f"{name}: no weights are bundled with ouromamba-fx and none can be "
                               f"downloaded; pass checkpoint=<file> (an upstream release file, or "
                               f"one written by tools/train_cifar.py)")
    kwargs = {k: v for k, v in kwargs.items() if k not in _TIMM_KWARGS or v is not None}
    for k in _TIMM_KWARGS & set(kwargs):
        raise TypeError(f"{name}: timm option {k}={kwargs[k]!r} is not supported (nothing is "
                        f"downloaded); pass checkpoint=<file> instead")
    if checkpoint is not None:
        return load(checkpoint, name=name, **kwargs)
    model_cls, _ = FAMILIES[family]
    return model_cls(_with(cfg, kwargs))


# ------------------------------------------------------------------------------------------------
# Reading checkpoint files

# A pickled yacs ``CfgNode`` (a dict subclass) is rebuilt as a plain OrderedDict: its items and
# attributes are data; weights_only only fills dict, OrderedDict and Counter objects, so the
# stand-in must be OrderedDict itself.
_SAFE_GLOBALS = [argparse.Namespace, (OrderedDict, "yacs.config.CfgNode")]
_STATE_KEYS = ("model", "state_dict", "model_state_dict")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a family checkpoint: ``.safetensors`` (with an optional ``<name>.json`` beside it) or a
    ``torch.save`` file whose state dict is the file itself or under ``model`` / ``state_dict``
    (VMamba and MambaVision releases, this package's training script)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        side = path.with_suffix(".json")
        return Checkpoint(load_file(str(path)), json.loads(side.read_text()) if side.is_file() else {},
                          str(path))
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(
            f"{path.name}: refusing to unpickle it: it holds "
            f"{'a ' + found.group(1) if found else 'an object'} besides tensors, plain containers, "
            f"argparse.Namespace and yacs configs, and loading it could run arbitrary code. Re-save "
            f"the weights alone (torch.save({{'model': state_dict}}, ...)) or as safetensors.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: expected a dict, found {type(obj).__name__}")
    for key in _STATE_KEYS:
        if isinstance(obj.get(key), dict):
            sd, meta = obj[key], {k: v for k, v in obj.items() if k != key}
            break
    else:
        sd, meta = obj, {}
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path.name}: no state dict of tensors found (keys: {sorted(obj)[:8]})")
    if isinstance(meta.get("args"), argparse.Namespace):
        meta["args"] = vars(meta["args"])
    return Checkpoint(dict(sd), meta, str(path))


def _strip_prefixes(sd: dict) -> dict:
    """Wrappers' prefixes: DataParallel ``module.``, Hugging Face ``model.``, MambaVision's
    ``encoder.`` (its loader keeps only those keys, as here)."""
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("encoder.") for k in sd) and not any(k.startswith("levels.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    return sd


# VMamba's own renames of its early checkpoints' names (VSSM._load_from_state_dict).
_VMAMBA_RENAMES = [(r"^patch_embed\.proj\.", "patch_embed.0."), (r"^patch_embed\.norm\.", "patch_embed.2."),
                   (r"^(layers\.\d+\.blocks\.\d+\.)ln_1\.", r"\1norm."),
                   (r"^(layers\.\d+\.blocks\.\d+\.)self_attention\.", r"\1op."),
                   (r"^norm\.", "classifier.norm."), (r"^head\.", "classifier.head.")]


def _vmamba_layout(sd: dict) -> dict:
    """VMamba state dicts in the released (classification code) layout: early key names renamed,
    and the single-file ``vmamba.py``'s grouped ``x_proj.weight`` / ``dt_projs.weight`` and
    ``downsample.{1,2}`` (v1) entries mapped back."""
    out = {}
    for k, v in sd.items():
        for pat, rep in _VMAMBA_RENAMES:
            k = re.sub(pat, rep, k)
        out[k] = v
    for k in [k for k in out if k.endswith(".op.x_proj.weight")]:
        prefix, w = k[: -len("x_proj.weight")], out.pop(k)
        e = w.shape[1]
        out[prefix + "x_proj_weight"] = w.reshape(len(vmamba.DIRECTIONS), -1, e)
        if prefix + "x_proj.bias" in out:
            out[prefix + "x_proj_bias"] = out.pop(prefix + "x_proj.bias").reshape(len(vmamba.DIRECTIONS), -1)
    for k in [k for k in out if k.endswith(".op.dt_projs.weight")]:
        prefix, w = k[: -len("dt_projs.weight")], out.pop(k)
        out[prefix + "dt_projs_weight"] = w.reshape(len(vmamba.DIRECTIONS), -1, w.shape[1])
    for k in [k for k in out if re.match(r"^layers\.\d+\.downsample\.2\.weight$", k) and out[k].dim() == 2]:
        base = k[: -len("2.weight")]
        out[base + "reduction.weight"] = out.pop(k)
        for p in ("weight", "bias"):
            if base + "1." + p in out:
                out[base + "norm." + p] = out.pop(base + "1." + p)
    return out


def detect_family(sd: dict, source: str = "the state dict") -> str:
    """The family whose layout ``sd`` has (after prefix stripping)."""
    if "patch_embed.conv_down.0.weight" in sd:
        return "mambavision"
    if any(k.startswith(("classifier.head.", "head.")) for k in sd) and any(".op." in k or "self_attention" in k for k in sd):
        return "vmamba"
    if "layers.0.mixer.A_log" in sd and "norm_f.bias" in sd and "layers.0.mixer.A_b_log" not in sd:
        return "mamba"
    raise CheckpointError(f"{source} has none of the layouts of MambaVision, VMamba or a "
                          f"mamba-ssm block stack (for hustvl/Vim use ouromamba_fx.models.load)")


def _count(sd: dict, pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def _mambavision_config(sd: dict, hints: dict, like: MambaVisionConfig | None) -> MambaVisionConfig:
    depths = tuple(_count(sd, rf"levels\.{i}\.blocks\.(\d+)\.") for i in range(4))
    dim = sd["patch_embed.conv_down.3.weight"].shape[0]
    fc1 = sd.get("levels.2.blocks.0.mlp.fc1.weight")
    head = sd.get("head.weight")
    shapes = dict(dim=dim, in_dim=sd["patch_embed.conv_down.0.weight"].shape[0],
                  in_chans=sd["patch_embed.conv_down.0.weight"].shape[1], depths=depths,
                  mlp_ratio=fc1.shape[0] / fc1.shape[1] if fc1 is not None else 4.0,
                  qkv_bias=any(k.endswith("mixer.qkv.bias") for k in sd),
                  qk_norm=any(k.endswith("mixer.q_norm.weight") for k in sd),
                  layer_scale=1e-5 if any(k.endswith(".gamma_1") for k in sd) else None,
                  layer_scale_conv=1e-5 if "levels.0.blocks.0.gamma" in sd else None,
                  num_classes=head.shape[0] if head is not None else 0)
    # window_size and num_heads are not in the weights: from the file's config, the given
    # registered model, or the published models of the same width.
    if like is None:
        like = next((c for fam, c in CONFIGS.values() if fam == "mambavision" and c.dim == dim), None)
    rest = {k: hints[k] for k in ("window_size", "num_heads", "img_size", "drop_path_rate") if k in hints}
    if like is None and not {"window_size", "num_heads"} <= set(rest):
        raise CheckpointError(f"MambaVision of width {dim}: its window_size and num_heads are not in "
                              f"the weights; pass name=<registered model> or window_size=/num_heads=")
    base = like.to_dict() if like is not None else {}
    return MambaVisionConfig(**{**base, **shapes, **rest})


def _vmamba_config(sd: dict, hints: dict) -> VMambaConfig:
    n = _count(sd, r"layers\.(\d+)\.")
    depths = tuple(_count(sd, rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(n))
    dims = tuple(sd[f"layers.{i}.blocks.0.norm.weight"].shape[0] if depths[i] else
                 sd[f"layers.{i - 1}.downsample.reduction.weight"].shape[0] for i in range(n))
    first = "layers.0.blocks.0."
    x_proj = sd[first + "op.x_proj_weight"]  # (K, R + 2N, E)
    a_logs, dt_w = sd[first + "op.A_logs"], sd[first + "op.dt_projs_weight"]
    e, d_state, dt_rank = x_proj.shape[2], a_logs.shape[1], dt_w.shape[2]
    gate = sd[first + "op.in_proj.weight"].shape[0] == 2 * e
    conv = sd.get(first + "op.conv2d.weight")
    fc1 = sd.get(first + "mlp.fc1.weight")
    v2_embed = "patch_embed.5.weight" in sd
    if "layers.0.downsample.reduction.weight" in sd:
        downsample = "v1"
    elif "layers.0.downsample.1.weight" in sd:
        downsample = {2: "v2", 3: "v3"}[sd["layers.0.downsample.1.weight"].shape[-1]]
    else:
        downsample = "none" if n > 1 else "v2"
    pe = sd["patch_embed.0.weight"]
    v0_like = downsample == "v1" and fc1 is None and gate
    cfg = dict(
        depths=depths, dims=dims, in_chans=pe.shape[1],
        patch_size=2 * (pe.shape[-1] - 1) if v2_embed else pe.shape[-1],
        num_classes=sd["classifier.head.weight"].shape[0], ssm_d_state=d_state,
        ssm_ratio=e / dims[0], ssm_dt_rank="auto" if dt_rank == math.ceil(dims[0] / 16) else dt_rank,
        ssm_conv=conv.shape[-1] if conv is not None else 1,
        ssm_conv_bias=first + "op.conv2d.bias" in sd,
        forward_type="v0" if v0_like else ("v05" if gate else "v05_noz"),
        mlp_ratio=fc1.shape[0] / fc1.shape[1] if fc1 is not None else 0.0,
        patch_norm=("patch_embed.7.weight" if v2_embed else "patch_embed.2.weight") in sd,
        norm_layer="ln" if v0_like else "ln2d", downsample_version=downsample,
        patchembed_version="v2" if v2_embed else "v1")
    # What the weights cannot say (layout, exact forward_type, activations): the file's config.
    y = (hints.get("MODEL") or {}).get("VSSM") or {}
    for ours, theirs in [("norm_layer", "NORM_LAYER"), ("forward_type", "SSM_FORWARDTYPE"),
                         ("ssm_act_layer", "SSM_ACT_LAYER"), ("mlp_act_layer", "MLP_ACT_LAYER"),
                         ("ssm_init", "SSM_INIT")]:
        if theirs in y:
            cfg[ours] = y[theirs]
    if (hints.get("DATA") or {}).get("IMG_SIZE"):
        cfg["img_size"] = int(hints["DATA"]["IMG_SIZE"])
    if y.get("POSEMBED") or y.get("GMLP"):
        raise CheckpointError("VMamba with POSEMBED or GMLP is not supported by ouromamba_fx")
    return VMambaConfig(**cfg)


def _mamba_config(sd: dict) -> MambaStackConfig:
    proj, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
    d_inner, d_state = sd["layers.0.mixer.A_log"].shape
    side = round(pos.shape[1] ** 0.5)
    head = sd.get("head.weight")
    return MambaStackConfig(img_size=side * proj.shape[-1], patch_size=proj.shape[-1],
                            in_chans=proj.shape[1], embed_dim=proj.shape[0],
                            depth=_count(sd, r"layers\.(\d+)\."), d_state=d_state,
                            d_conv=sd["layers.0.mixer.conv1d.weight"].shape[-1],
                            expand=d_inner // proj.shape[0],
                            dt_rank=sd["layers.0.mixer.dt_proj.weight"].shape[1],
                            num_classes=head.shape[0] if head is not None else 0)


#: Fields that define the architecture (compared against a registered name's config).
_ARCH = {"mambavision": ("dim", "in_dim", "depths", "mlp_ratio", "in_chans"),
         "vmamba": ("depths", "dims", "patch_size", "ssm_d_state", "ssm_ratio", "forward_type",
                    "mlp_ratio", "downsample_version", "patchembed_version", "in_chans"),
         "mamba": ("img_size", "patch_size", "embed_dim", "depth", "d_state", "expand", "in_chans")}


def _arch_value(cfg, field: str):
    value = getattr(cfg, field)
    # VMamba forward_type strings that differ only in implementation (v01..v05, v3) are one form.
    return vmamba.parse_forward_type(value) if field == "forward_type" else value


def load(checkpoint: str | Path, name: str | None = None, family: str | None = None, **overrides) -> nn.Module:
    """Build the model a family checkpoint holds and load its weights strictly (eval mode).

    Args:
        checkpoint: a release file of NVlabs MambaVision (``*.pth.tar``, ``state_dict`` key) or
            MzeroMiko VMamba (``*.pth``, ``model`` key; its pickled yacs config is read as plain
            data), a file of ``tools/train_cifar.py``, a plain state-dict file or safetensors.
        name: optional registered name (e.g. ``"vmamba_v2_tiny_s2l5"``): its config fills in what the
            weights do not say, and the weights' shapes must agree with it.
        family: ``"mambavision"``, ``"vmamba"`` or ``"mamba"``; detected from the keys when omitted.
        overrides: config fields to set (e.g. ``mean``/``std``/``classes`` the file does not say).
    """
    ckpt = read_checkpoint(checkpoint)
    fname = Path(checkpoint).name
    sd = _strip_prefixes(ckpt.state_dict)
    like = None
    if name is not None:
        family_of_name, like = config_for(name)
        family = family or family_of_name
        if family != family_of_name:
            raise CheckpointError(f"{fname}: {name} is a {family_of_name} model, not {family}")
    if family == "vmamba" or (family is None and detect_family(_vmamba_layout(sd), fname) == "vmamba"):
        sd = _vmamba_layout(sd)
    family = family or detect_family(sd, fname)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    model_cls, cfg_cls = FAMILIES[family]
    meta = ckpt.meta
    own = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    try:
        if own and meta.get("family") == family:  # written by this package (tools/train_cifar.py)
            cfg = cfg_cls(**own)
        elif family == "mambavision":
            cfg = _mambavision_config(sd, {**own, **overrides}, like)
        elif family == "vmamba":
            cfg = _vmamba_config(sd, own)
        else:
            cfg = _mamba_config(sd)
    except KeyError as e:
        raise CheckpointError(f"{fname}: not a {family} state dict (no {e.args[0]!r})") from None
    except (TypeError, ValueError) as e:  # e.g. a forward_type the file's config names
        raise CheckpointError(f"{fname}: its configuration cannot be built: {e}") from None
    if like is not None:
        diff = [f"{f}: checkpoint {getattr(cfg, f)} vs {name} {getattr(like, f)}"
                for f in _ARCH[family] if _arch_value(cfg, f) != _arch_value(like, f)]
        if diff:
            raise CheckpointError(f"{fname} is not a {name}: " + "; ".join(diff))
        # The registered config, with what a fine-tuned file may change (weights not involved
        # in the architecture check make strict loading fail if they differ).
        cfg = _with(like, {"num_classes": cfg.num_classes, "classes": cfg.classes})
    for key in ("mean", "std", "classes"):
        if meta.get(key) is not None:
            overrides.setdefault(key, meta[key])
    cfg = _with(cfg, overrides)
    model = model_cls(cfg)
    load_state_dict_strict(model, sd, fname)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Canonicalisation of upstream objects

def _canonical_child(module: nn.Module) -> nn.Module | None:
    if mambavision.is_upstream_model(module):
        return mambavision.from_upstream(module)
    if vmamba.is_upstream_model(module):
        return vmamba.from_upstream(module)
    if mambavision.is_upstream_mixer(module):
        return mambavision.mixer_from_upstream(module)
    if vmamba.is_upstream_ss2d(module):
        return vmamba.ss2d_from_upstream(module)
    if is_upstream_mamba(module):
        return canonicalize_mamba(module)
    return None


def _is_upstream(module: nn.Module) -> bool:
    return (mambavision.is_upstream_model(module) or vmamba.is_upstream_model(module)
            or mambavision.is_upstream_mixer(module) or vmamba.is_upstream_ss2d(module)
            or is_upstream_mamba(module))


def has_upstream(model: nn.Module) -> bool:
    """Whether ``model`` is or holds a module :func:`canonicalize` rebuilds."""
    return any(_is_upstream(m) for m in model.modules())


def upstream_modules(model: nn.Module) -> dict[str, str]:
    """Qualified name -> class of the outermost upstream modules :func:`canonicalize` rebuilds."""
    found: dict[str, str] = {}
    for name, m in model.named_modules():
        if _is_upstream(m) and not any(name.startswith(p + ".") or p == "" for p in found):
            found[name] = f"{type(m).__module__}.{type(m).__qualname__}"
    return found


def canonical_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it holds no upstream module, else :func:`canonicalize` of a copy of
    its module tree that shares the parameters and buffers: the caller's model is not changed."""
    if not has_upstream(model):
        return model
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return canonicalize(copy.deepcopy(model, memo))


def _swap_children(parent: nn.Module) -> None:
    for child_name, child in list(parent.named_children()):
        new = _canonical_child(child)
        if new is not None:
            setattr(parent, child_name, new)
        else:
            _swap_children(child)


def canonicalize(model: nn.Module) -> nn.Module:
    """Replace the upstream modules in ``model`` by this package's traceable equivalents, sharing
    their parameters (no copy), and return the result.

    Recognised: NVlabs ``MambaVision`` (whole model) and ``MambaVisionMixer``; MzeroMiko VMamba
    ``VSSM`` (whole model) and ``SS2D``; mamba-ssm ``Mamba`` (and hustvl/Vim's bidirectional fork).
    A whole upstream model is returned as the package's class (:class:`MambaVision`,
    :class:`VSSM`); inside any other model the outermost recognised modules are swapped in place
    (the upstream objects they replace are left as they were). Modules of these families that
    cannot be expressed raise :class:`~ouromamba_fx.errors.OuroMambaError` naming them.
    """
    whole = _canonical_child(model)
    if whole is not None:
        return whole
    _swap_children(model)
    return model


def _register(name: str) -> None:
    family = CONFIGS[name][0]

    def fn(pretrained: bool = False, **kwargs) -> nn.Module:
        return create(name, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"{FAMILIES[family][0].__name__} {name} (ouromamba-fx)."
    fn.__module__ = __name__
    globals()[name] = fn
    register_model(fn)


for _name in CONFIGS:
    _register(_name)

__all__ = ["CONFIGS", "FAMILIES", "bundled_checkpoint", "canonicalize", "config_for", "create",
           "detect_family", "canonical_copy", "has_upstream", "load", "read_checkpoint", "upstream_modules"]
