"""Outlier maps: where OuroMamba-Quant's run-time outlier channels are, per time-step and channel.

At every mixed-precision site (a ``quantize_mixed`` node) the map is the fraction of calibration
samples in which channel ``c`` at time-step ``t`` was flagged as an outlier (kept at the outlier
bit-width), shape ``(L, C)``. :func:`heatmap` draws it in the terminal (rich, two time-steps per
line), :func:`save_png` as a PNG (needs the ``plot`` extra: ``pip install "ouromamba-fx[plot]"``).

    >>> maps = q.outlier_map(3)                         # doctest: +SKIP
    >>> rich.print(heatmap(maps["layers.3.mixer.in_proj"], "layer 3 in_proj"))  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from rich.style import Style
from rich.text import Text
from torch import Tensor

from ouromamba_fx.errors import OuroMambaError


def select(maps: dict[str, Tensor], layer: int | str) -> dict[str, Tensor]:
    """The maps of one layer (an index, as in ``layers.3.``) or of sites whose name contains
    ``layer`` (a string, e.g. ``"layers.3.mixer.in_proj"``)."""
    if not maps:
        raise OuroMambaError("no outlier maps: the model has no mixed-precision sites (a config "
                             "with outliers, e.g. W4A4O8 or W4A8) or was saved without them")
    if isinstance(layer, int):
        pat = re.compile(rf"(^|\.)layers\.{layer}\.")
        found = {s: m for s, m in maps.items() if pat.search(s)}
    else:
        found = {s: m for s, m in maps.items() if layer in s}
    if not found:
        layers = sorted({int(m.group(1)) for s in maps if (m := re.search(r"layers\.(\d+)\.", s))})
        raise OuroMambaError(f"no outlier map for layer {layer!r}; layers with maps: {layers}")
    return found


def _pool(m: Tensor, rows: int, cols: int) -> Tensor:
    """Shrink (L, C) to at most (rows, cols) by max over blocks, so single outliers stay visible."""
    t = m[None, None].float()
    out_rows, out_cols = min(rows, m.shape[0]), min(cols, m.shape[1])
    return torch.nn.functional.adaptive_max_pool2d(t, (out_rows, out_cols))[0, 0]


def _colour(v: float) -> str:
    """Dark blue (0) -> red -> yellow (1)."""
    v = max(0.0, min(1.0, v))
    if v <= 0.0:
        return "rgb(20,20,40)"
    if v < 0.5:
        f = v / 0.5
        return f"rgb({int(60 + 180 * f)},{int(20 + 20 * f)},{int(90 - 60 * f)})"
    f = (v - 0.5) / 0.5
    return f"rgb(240,{int(40 + 200 * f)},{int(30 + 60 * f)})"


SHADES = " .:-=+*#%@"  # plain-text intensity ramp, for terminals without colour (and logs)


class Heatmap:
    """A compact terminal heat map of an ``(L, C)`` map (see :func:`heatmap`)."""

    def __init__(self, m: Tensor, title: str = "", max_cols: int = 64, max_lines: int = 16) -> None:
        self.m, self.title, self.max_cols, self.max_lines = m, title, max_cols, max_lines

    def _header(self) -> Text:
        m = self.m
        return Text(f"{self.title}  (time-steps {m.shape[0]} x channels {m.shape[1]}; max "
                    f"{100 * float(m.max()):.1f}% of samples, mean {100 * float(m.mean()):.2f}%)", style="bold")

    def __rich_console__(self, console, options):
        yield self._header()
        if console.color_system is None:  # plain text: one pooled row per line, shaded characters
            p = _pool(self.m, self.max_lines, self.max_cols)
            for row in p:
                yield Text("|" + "".join(SHADES[min(int(float(v) * len(SHADES)), len(SHADES) - 1)] if v > 0 else " "
                                         for v in row) + "|")
            yield Text(f"shades {SHADES!r}: 0% -> 100% of samples flagged; rows: time-steps (first at the "
                       f"top, max-pooled), columns: channels (max-pooled)", style="dim")
            return
        p = _pool(self.m, 2 * self.max_lines, self.max_cols)
        if p.shape[0] % 2:
            p = torch.cat([p, p.new_full((1, p.shape[1]), -1.0)])
        for r in range(0, p.shape[0], 2):  # two time-steps per line: upper and lower half block
            line = Text()
            for c in range(p.shape[1]):
                top, bottom = float(p[r, c]), float(p[r + 1, c])
                line.append("▀", Style.parse(f"{_colour(top)} on {_colour(bottom) if bottom >= 0 else 'default'}"))
            yield line
        legend = Text("0% ")
        for v in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
            legend.append("██", Style.parse(_colour(v)))
        legend.append(" 100% of samples flagged; rows: time-steps (first at the top), columns: channels")
        yield legend


def heatmap(m: Tensor, title: str = "", max_cols: int = 64, max_lines: int = 16) -> Heatmap:
    """A compact terminal heat map of an ``(L, C)`` map: time-steps down, channels across, both
    max-pooled (so a single flagged channel stays visible) to at most ``max_lines`` lines and
    ``max_cols`` columns; coloured half blocks in a colour terminal, shaded characters otherwise."""
    return Heatmap(m, title, max_cols, max_lines)


def save_png(maps: dict[str, Tensor], path: str | Path, title: str = "") -> Path:
    """One panel per site (time-step x channel, colour = fraction of samples flagged) in a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OuroMambaError('writing a PNG needs matplotlib: pip install "ouromamba-fx[plot]" '
                             '(or pip install matplotlib); the terminal heat map needs nothing') from None
    n = len(maps)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    for i, (ax, (site, m)) in enumerate(zip(axes.flat, maps.items())):
        im = ax.imshow(m.numpy(), aspect="auto", cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(site, fontsize=8)
        if i // cols == rows - 1 or i + cols >= n:
            ax.set_xlabel("channel")
        if i % cols == 0:
            ax.set_ylabel("time-step")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="fraction of samples flagged as outlier")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
