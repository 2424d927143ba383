import torch

import ouromamba_fx as of
from ouromamba_fx.cli import main


def test_diff_per_pass_collapses_identical_layers(tiny_vim):
    q = of.convert(tiny_vim, calib=torch.randn(4, 3, 16, 16), show_progress=False)
    diffs = list(q.diff())
    assert [(d.before, d.after) for d in diffs] == list(zip(q.passes, q.passes[1:]))
    obs = next(d for d in diffs if d.after == "insert_observers")
    assert obs.counts == {"+": 28, "-": 0, "~": 20}  # 28 observers; 20 consumers rewired
    text = str(obs)
    assert "layers 0-1: identical changes in each, layer 0 shown" in text
    assert "+ layers_0_mixer_in_proj_obs = call_module" in text
    assert "layers_1_" not in text  # collapsed
    assert "(no change to the graph)" in str(q.diff("calibrate", "choose_act_scales"))


def test_diff_filters_by_layer_and_role(tiny_vim):
    q = of.convert(tiny_vim, calib=torch.randn(4, 3, 16, 16), show_progress=False)
    d = q.diff("choose_act_scales", "quantize_activations", layer=1, role="x_proj")
    assert d.changes and all(c.tag["layer"] == 1 and c.tag["role"] == "x_proj" for c in d.changes)
    text = str(d)
    assert "ouromamba::quantize" in text and "layer 1" in text
    full = str(q.diff("choose_act_scales", "quantize_activations", collapse=False, verbose=True))
    assert "layers_1_mixer_x_proj_b_scale = get_attr" in full


def test_cli_diff(capsys):
    assert main(["diff", "--limit-per-class", "2", "--layer", "3", "--role", "dt_proj"]) == 0
    text = capsys.readouterr().out
    assert "annotate → insert_observers" in text and "layers_3_mixer_dt_proj_obs" in text
    assert "layers_2_" not in text
