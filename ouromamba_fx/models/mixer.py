"""The Mamba mixer in a form torch.fx can trace.

The parameter names are exactly those of hustvl/Vim's bimamba-v2 ``Mamba`` (and of mamba-ssm's
``Mamba`` for the forward direction), so checkpoints load as they are. The differences from the
upstream module are in how the forward pass is written, not in what it computes:

* every selective scan is one call of the ``ouromamba::selective_scan`` custom op (one FX node,
  never an unrolled loop);
* ``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj`` and ``out_proj`` are called as modules, so they
  stay ``call_module`` nodes that quantization passes can find and swap;
* ``dt_proj`` is applied with its bias (upstream passes the bias to the scan as ``delta_bias``);
  the sum is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ouromamba_fx.ops.scan import selective_scan

# Names of the sub-modules and parameters of one scan direction: (conv1d, x_proj, dt_proj, A_log, D).
DIRECTIONS = {
    "fwd": ("conv1d", "x_proj", "dt_proj", "A_log", "D"),
    "bwd": ("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b"),
}


class MambaMixer(nn.Module):
    """Selective-state-space mixer (Mamba), optionally bidirectional as in Vim ("bimamba v2").

    Args:
        d_model: token width.
        d_state: SSM state size N.
        d_conv: depthwise causal conv kernel size.
        expand: ``d_inner = expand * d_model``.
        dt_rank: rank of the delta projection; ``"auto"`` is ``ceil(d_model / 16)``.
        bimamba: add the backward direction (``*_b`` parameters) on the flipped sequence.
        divide_out: average the two directions (Vim's ``if_devide_out``) instead of summing.

    Input and output: ``(batch, L, d_model)``.

    Example:
        >>> m = MambaMixer(64)
        >>> m(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        bimamba: bool = True,
        divide_out: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if d_conv < 1:
            raise ValueError(f"MambaMixer: d_conv must be >= 1, got {d_conv}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bimamba = bimamba
        self.divide_out = divide_out

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        for direction in ("fwd", "bwd") if bimamba else ("fwd",):
            conv, xp, dtp, a_log, d = DIRECTIONS[direction]
            setattr(self, conv, nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                          padding=d_conv - 1, bias=conv_bias))
            setattr(self, xp, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, dtp, nn.Linear(self.dt_rank, self.d_inner, bias=True))
            a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            setattr(self, a_log, nn.Parameter(torch.log(a)))
            setattr(self, d, nn.Parameter(torch.ones(self.d_inner)))
            self._init_dt(getattr(self, dtp), dt_min, dt_max)

    def _init_dt(self, dt_proj: nn.Linear, dt_min: float, dt_max: float) -> None:
        # Mamba's initialisation: delta = softplus(bias) log-uniform in [dt_min, dt_max].
        with torch.no_grad():
            std = self.dt_rank ** -0.5
            dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=1e-4)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        y = self._ssm(x, z, "fwd")
        if self.bimamba:
            y_b = self._ssm(x.flip(-1), z.flip(-1), "bwd")
            y = y + y_b.flip(-1)
            if self.divide_out:
                y = y / 2
        return self.out_proj(y.transpose(1, 2))

    def _ssm(self, x: torch.Tensor, z: torch.Tensor, direction: str) -> torch.Tensor:
        conv_name, xp_name, dtp_name, a_name, d_name = DIRECTIONS[direction]
        x = getattr(self, conv_name)(x)
        if self.d_conv > 1:
            x = x[..., : -(self.d_conv - 1)]  # causal: drop the right padding
        u = F.silu(x)
        x_dbl = getattr(self, xp_name)(u.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = getattr(self, dtp_name)(dt).transpose(1, 2)  # (B, d_inner, L), bias included
        a = -torch.exp(getattr(self, a_name).float())
        if self._gen_record is not None:  # OuroMamba-Gen recording hook (see below)
            return self._ssm_recorded(u, delta, a, b, c, z, direction)
        return selective_scan(u, delta, a, b.transpose(1, 2), c.transpose(1, 2),
                              getattr(self, d_name).float(), z, None, True)

    # --- OuroMamba-Gen recording hook (ouromamba_fx.gen) ----------------------------------------
    # ``_gen_record`` is None (class default) except inside ``ouromamba_fx.gen.record_scan``, which
    # sets it to a dict on the instance. Then ``_ssm`` runs the scan without D and z to get the raw
    # readout ``yhat_t = C_t . h_t`` per channel, stores ``(yhat, softplus(delta))`` (token order,
    # each (batch, d_inner, L)) under the direction's name, and applies ``(yhat + D*u) * silu(z)``
    # itself: the same output as the normal path, still differentiable. When it is None the code
    # path (and so the traced FX graph) is the normal one above.
    _gen_record: dict | None = None

    def _ssm_recorded(self, u, delta, a, b, c, z, direction: str) -> torch.Tensor:
        d = getattr(self, DIRECTIONS[direction][4]).float()
        step = F.softplus(delta)  # what the scan's delta_softplus computes (threshold 20), done once here
        yhat = selective_scan(u, step, a, b.transpose(1, 2), c.transpose(1, 2), None, None, None, False)
        if direction == "bwd":  # the backward scan ran on the flipped sequence
            self._gen_record[direction] = (yhat.flip(-1), step.flip(-1))
        else:
            self._gen_record[direction] = (yhat, step)
        out = (yhat + d[:, None] * u.float()) * F.silu(z.float())
        return out.to(u.dtype)
    # --- end of the OuroMamba-Gen recording hook -------------------------------------------------
