"""Outlier maps (time-step x channel fraction of samples flagged): values, selection, drawing."""

import builtins
import io

import pytest
import torch
from rich.console import Console

from ouromamba_fx.errors import OuroMambaError
from ouromamba_fx.ops.mixed import outlier_map
from ouromamba_fx.outliers import heatmap, save_png, select


def _render(obj, color: bool) -> str:
    buf = io.StringIO()
    con = Console(file=buf, width=100, force_terminal=color, color_system="truecolor" if color else None)
    con.print(obj)
    return buf.getvalue()


def test_map_counts_the_samples_flagged_at_each_step_and_channel():
    x = torch.full((4, 3, 5), 0.1)  # (batch, L, C)
    x[:2, 1, 2] = 10.0  # two of four samples spike in channel 2 at step 1
    m = outlier_map(x, torch.full((3,), 0.05), 1, 2, 4, 8, 1.0, 1)
    expect = torch.zeros(3, 5)
    expect[1, 2] = 0.5
    assert torch.equal(m, expect)
    # the same tensor laid out (batch, C, L), as the scan's inputs are
    m2 = outlier_map(x.transpose(1, 2), torch.full((3,), 0.05), 2, 1, 4, 8, 1.0, 1)
    assert torch.equal(m2, expect)


def test_select_by_layer_or_site_and_say_what_exists():
    maps = {"layers.0.mixer.in_proj": torch.zeros(2, 2), "layers.1.mixer.in_proj": torch.ones(2, 2),
            "layers.11.mixer.out_proj": torch.ones(2, 2)}
    assert list(select(maps, 1)) == ["layers.1.mixer.in_proj"]  # not layers.11
    assert list(select(maps, "out_proj")) == ["layers.11.mixer.out_proj"]
    with pytest.raises(OuroMambaError, match=r"no outlier map for layer 5; layers with maps: \[0, 1, 11\]"):
        select(maps, 5)
    with pytest.raises(OuroMambaError, match="no mixed-precision sites"):
        select({}, 0)


def test_heatmap_plain_and_colour():
    m = torch.zeros(40, 300)
    m[0, 0] = 1.0  # one hot cell survives max-pooling to 64 columns / 16 lines
    plain = _render(heatmap(m, "site"), color=False)
    lines = plain.splitlines()
    assert "site" in lines[0] and "time-steps 40 x channels 300" in lines[0]
    assert lines[1].startswith("|@") and set(lines[2]) <= {"|", " "}
    assert len(lines[1]) == 64 + 2 and sum(ln.startswith("|") for ln in lines) == 16
    coloured = _render(heatmap(m, "site"), color=True)
    assert "▀" in coloured and "\x1b[" in coloured


def test_png_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(OuroMambaError, match=r'pip install "ouromamba-fx\[plot\]"'):
        save_png({"s": torch.zeros(2, 2)}, tmp_path / "x.png")
