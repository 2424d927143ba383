"""The command line end to end on a tiny model: convert --out, inspect, diff, eval, bench."""

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ouromamba_fx.cli import build_parser, main
from ouromamba_fx.models import VisionMamba
from tests.conftest import tiny_config


def _flat(text: str) -> str:
    """Output with rich's line wrapping undone (it wraps at 80 columns when not a terminal)."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = VisionMamba(tiny_config())
    save_file(model.state_dict(), str(d / "tiny.safetensors"))
    torch.manual_seed(1)
    save_file(VisionMamba(tiny_config()).state_dict(), str(d / "other.safetensors"))
    for c in range(5):  # 5 classes x 2 images, 16 x 16
        (d / "data" / str(c)).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(d / "data" / str(c) / f"{i}.jpg")
    return d


@pytest.fixture(scope="module")
def saved(files):
    out = files / "q.safetensors"
    # data-free (the default) with a tiny OuroMamba-Gen run
    assert main(["convert", "--checkpoint", str(files / "tiny.safetensors"), "--config", "W4A4O8",
                 "--gen-n", "4", "--gen-iters", "1", "--out", str(out)]) == 0
    return out


def test_convert_is_data_free_by_default_and_saves(saved, capsys):
    assert saved.is_file()


def test_inspect_shows_report_and_outlier_maps(saved, files, capsys):
    png = files / "l1.png"
    assert main(["inspect", str(saved), "--outliers", "1", "--png", str(png)]) == 0
    text = _flat(capsys.readouterr().out)
    assert "ouromamba_fx.quantized v2" in text and "embed_dim=32" in text
    assert "W4A4O8: W4 per_channel" in text and "calibration: data-free, 4 OuroMamba-Gen images" in text
    assert "layers.1.mixer.in_proj (time-steps 17 x channels 32" in text  # heat map header
    assert "layers.0.mixer.in_proj (" not in text  # only the layer asked for
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_inspect_of_a_file_that_is_not_ours(files, capsys):
    assert main(["inspect", str(files / "tiny.safetensors")]) == 2
    assert "not a quantized model saved by ouromamba-fx" in _flat(capsys.readouterr().err)


def test_error_messages_are_printed_verbatim(saved, files, capsys, monkeypatch):
    """Rich markup must not eat parts of a message, e.g. the [plot] of 'pip install "ouromamba-fx[plot]"'."""
    import ouromamba_fx.outliers as outliers

    def no_matplotlib(*a, **k):
        raise outliers.OuroMambaError('writing a PNG needs matplotlib: pip install "ouromamba-fx[plot]"')

    monkeypatch.setattr(outliers, "save_png", no_matplotlib)
    assert main(["inspect", str(saved), "--png", str(files / "x.png")]) == 2
    assert 'pip install "ouromamba-fx[plot]"' in capsys.readouterr().err


def test_diff_from_a_saved_file(saved, capsys):
    assert main(["diff", "--quantized", str(saved), "--layer", "1", "--role", "dt_proj"]) == 0
    text = capsys.readouterr().out
    assert "annotate → insert_observers" in text and "layers_1_mixer_dt_proj_obs" in text
    assert "layers_0_" not in text


def test_eval_float_and_quantized_side_by_side(saved, files, capsys):
    assert main(["eval", "--checkpoint", str(files / "tiny.safetensors"), "--quantized", str(saved),
                 "--data", str(files / "data")]) == 0
    text = capsys.readouterr().out
    assert "top-1 on " in text and "agreement with float" in text and "W4A4O8" in text
    assert "vs float (95% interval)" in text and " ± " in text  # the drop comes with its uncertainty
    # the same file against another float model: refused, with the reason
    assert main(["eval", "--checkpoint", str(files / "other.safetensors"), "--quantized", str(saved),
                 "--data", str(files / "data")]) == 2
    assert "quantized from a different model" in _flat(capsys.readouterr().err)


def test_bench_reports_ratios(saved, files, capsys):
    assert main(["bench", "--checkpoint", str(files / "tiny.safetensors"), "--quantized", str(saved),
                 "--batch-size", "2", "--repeats", "1", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "float eager" in text and "W4A4O8 reference graph (eager)" in text and "1.00x" in text
    assert "not the fast path" in text


def test_bench_says_how_malloc_is_set(saved, files, capsys):
    # main() (a Python caller's entry) leaves the allocator alone; the console command tunes it
    assert main(["bench", "--checkpoint", str(files / "tiny.safetensors"), "--quantized", str(saved),
                 "--batch-size", "2", "--repeats", "1", "--threads", "1"]) == 0
    assert "malloc: this process's C library defaults" in _flat(capsys.readouterr().out)


@pytest.mark.parametrize("env, code, kept", [(None, 0, True), ("default", 0, False), ("tuned", 0, True),
                                             ("fast", 2, False)])
def test_console_command_keeps_freed_memory_unless_told_not_to(env, code, kept):
    import os
    import subprocess
    import sys

    from ouromamba_fx import cpu_malloc
    from ouromamba_fx.cli import MALLOC_ENV

    if cpu_malloc._glibc() is None and kept:
        pytest.skip("tune_malloc sets glibc's malloc; this C library is not glibc")
    child = ("from ouromamba_fx import cli, cpu_malloc\n"
             "code = cli.console(['inspect', '--help'])\n"
             "print('RESULT', code, bool(cpu_malloc.applied()))")
    environ = {k: v for k, v in os.environ.items() if k != MALLOC_ENV}
    if env is not None:
        environ[MALLOC_ENV] = env
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=environ, timeout=300)
    assert f"RESULT {code} {kept}" in run.stdout
    if code == 2:
        assert "OUROMAMBA_FX_MALLOC='fast'" in run.stderr and "'tuned'" in run.stderr


def test_every_command_has_help_with_examples(capsys):
    parser = build_parser()
    for cmd in ("convert", "inspect", "diff", "eval", "bench", "gen"):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        assert "examples:" in text and "ouromamba-fx inspect q.safetensors" in text, cmd
