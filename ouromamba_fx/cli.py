"""The ``ouromamba-fx`` command line."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ouromamba_fx.config import PRESETS, ROLES
from ouromamba_fx.errors import OuroMambaError

out = Console()
err = Console(stderr=True)

EXAMPLES = """examples:
  ouromamba-fx convert --config W4A4O8 --out q.safetensors      # data-free (OuroMamba-Gen), saved
  ouromamba-fx convert --calib bundled --limit-per-class 4 --out q.safetensors   # quick: bundled images
  ouromamba-fx convert --calib path/to/calib --eval path/to/val # real calibration images, then top-1
  ouromamba-fx inspect q.safetensors                            # the report of a saved model
  ouromamba-fx inspect q.safetensors --outliers 3 --png l3.png  # outlier map of layer 3
  ouromamba-fx diff --quantized q.safetensors --layer 3 --role x_proj   # what each pass did
  ouromamba-fx eval --quantized q.safetensors --limit-per-class 5       # float vs quantized top-1
  ouromamba-fx bench --quantized q.safetensors                  # latency, float vs quantized
  ouromamba-fx export q.safetensors --out vim.pt2 --aoti        # AOTInductor package (Python or C++)
  ouromamba-fx gen --n 64 --out synth.safetensors --grid synth.png      # synthetic calibration images
  ouromamba-fx eval --checkpoint vim_s.pth --model vim_small_patch16_224 --data imagenet/val
"""


class UsageError(OuroMambaError):
    """A command-line argument that cannot work (found before any work starts)."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), as every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- argument types: nonsense values are refused while the arguments are parsed ---------------

def _int(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    parse.__name__ = "int"
    return parse


def _float(lo: float, strict: bool):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < lo or (strict and v == lo):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {lo:g}, got {text}")
        return v

    parse.__name__ = "float"
    return parse


def _odd(text: str) -> int:
    v = _int(1)(text)
    if v % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be odd (a p x p neighbourhood around a patch), got {v}")
    return v


def _preset(text: str) -> str:
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {text!r}; known: {', '.join(PRESETS)}")
    return text


def _model_name(text: str) -> str:
    from ouromamba_fx.models.catalog import CONFIGS

    if text not in CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; known: {', '.join(CONFIGS)}")
    return text


POSITIVE, NON_NEGATIVE = _int(1), _int(0)


def _check_output(path: str | None, what: str) -> None:
    """Before any work: ``path`` can be written (not a folder; its folder exists and is writable)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what} {path!r} is a folder; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what} {path!r}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{what} {path!r} cannot be written (permission denied)")


def _check_input(path: str | None, what: str, folder: bool = False) -> None:
    """Before any work: ``path`` exists and is a file (or a folder when ``folder``)."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {path!r} does not exist")
    if folder and not p.is_dir():
        raise UsageError(f"{what} {path!r} is a file; expected a folder of <class>/*.jpg")
    if not folder and p.is_dir():
        raise UsageError(f"{what} {path!r} is a folder; expected a file")


@contextlib.contextmanager
def _writing(path: str, what: str):
    """Writing an output the checks before the work allowed: a failure now (disk full, the folder
    gone) is still one line naming the file."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        raise UsageError(f"{what} {path!r} could not be written: {' '.join(str(e).split())[:200]}") from e


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, type=_model_name,
                   help="registered model name (default: the bundled reference vim_cifar_d128_l8)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file (hustvl/Vim .pth, state dict, or .safetensors)")


def load_model(args: argparse.Namespace):
    from ouromamba_fx import models
    from ouromamba_fx.models.catalog import BUNDLED

    if args.checkpoint:
        return models.load(args.checkpoint, name=args.model), args.model or args.checkpoint
    name = args.model or "vim_cifar_d128_l8"
    if name not in BUNDLED:
        raise UsageError(f"--model {name}: no weights are bundled for it and none can be downloaded; give "
                         f"its checkpoint with --checkpoint FILE (bundled: {', '.join(BUNDLED)})")
    return models.create(name, pretrained=True), name


def _data(folder: str | None) -> tuple[str, str]:
    """(folder, label): a folder given by the user, or the bundled sample."""
    from ouromamba_fx.data import bundled_samples

    return (folder, folder) if folder else (bundled_samples(), "bundled sample")


def _load_quantized(path: str, model=None):
    from ouromamba_fx.serialize import load

    q = load(path, model=model)
    out.print(f"loaded {escape(str(path))}: {q.model_name} quantized with {q.config.name}")
    return q


def cmd_eval(args: argparse.Namespace) -> int:
    from ouromamba_fx.capture import capture, scan_nodes
    from ouromamba_fx.evaluate import evaluate

    _check_input(args.data, "--data", folder=True)
    _check_input(args.quantized, "--quantized")
    model, name = load_model(args)
    data, label = _data(args.data)
    runs = [("eager", model)]
    if args.traced:
        gm = capture(model)
        out.print(f"captured {name}: {len(gm.graph.nodes)} nodes, {len(scan_nodes(gm))} scan nodes")
        runs.append(("traced", gm))
    if args.quantized:
        q = _load_quantized(args.quantized, model)  # an error if it was made from another model
        runs.append((q.config.name, q))
    results = {}
    for kind, m in runs:
        r = evaluate(m, data, batch_size=args.batch_size, limit_per_class=args.limit_per_class,
                     transform_model=model, description=f"{name} ({kind})")
        results[kind] = r
        out.print(r.summary(f"{name} ({kind})", label))
    if "traced" in results:
        out.print(f"traced vs eager: top-1 agreement "
                  f"{results['traced'].agreement(results['eager']):.2f}%")
    if args.quantized:
        out.print(_side_by_side(results, label))
    return 0


def _side_by_side(results: dict, label: str) -> Table:
    base = results["eager"]
    t = Table(title=f"top-1 on {label} ({base.total} images)", title_justify="left", header_style="bold")
    # the drop with its 95 % interval (paired over the images): on a few hundred images one
    # image is a large fraction of a point, and the printed drop must not look more exact than it is
    for col in ("model", "top-1 %", "vs float (95% interval)", "agreement with float", "img/s"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for kind, r in results.items():
        shown = "float" if kind == "eager" else kind
        if kind == "eager":
            delta = ""
        else:
            diff, half = r.paired_difference(base)
            delta = f"{diff:+.2f} ± {half:.2f}"
        t.add_row(shown, f"{r.top1:.2f}", delta, f"{r.agreement(base):.2f}%",
                  f"{r.total / max(r.seconds, 1e-9):.0f}")
    return t


def _calib(args: argparse.Namespace, model, default: str):
    """(calib for convert, gen_options, description) from --calib."""
    from ouromamba_fx.data import image_loader

    src = args.calib or default
    if src == "datafree":
        opts = {"n": args.gen_n, "iters": args.gen_iters, "seed": args.seed}
        return None, opts, f"data-free: {args.gen_n} OuroMamba-Gen images, {args.gen_iters} iterations"
    if src.endswith(".safetensors"):
        from ouromamba_fx.gen import SyntheticCalib

        synth = SyntheticCalib.load(src)
        return synth, None, f"{len(synth.images)} synthetic images from {src}"
    folder, label = _data(None if src == "bundled" else src)
    loader = image_loader(model, folder, batch_size=100, limit_per_class=args.limit_per_class, labels=False)
    return loader, None, f"{len(loader.dataset)} images from {label}"


def _check_calib(args: argparse.Namespace) -> None:
    src = args.calib
    if src in (None, "datafree", "bundled"):
        return
    _check_input(src, "--calib", folder=not src.endswith(".safetensors"))


def _convert(args: argparse.Namespace, default_calib: str, loaded: tuple | None = None):
    import ouromamba_fx as of

    _check_calib(args)
    model, name = loaded or load_model(args)
    calib, gen_options, what = _calib(args, model, default_calib)
    out.print(f"converting {name} with {args.config}; calibration: {what}")
    config = of.config.preset(args.config)
    q = of.convert(model, calib=calib, config=config, gen_options=gen_options)
    return model, name, q


def cmd_convert(args: argparse.Namespace) -> int:
    from ouromamba_fx.evaluate import evaluate

    _check_output(args.out, "--out")
    _check_input(args.eval or None, "--eval", folder=True)
    model, name, q = _convert(args, "datafree")
    out.print(q.report())
    if args.out:
        with _writing(args.out, "--out"):
            q.save(args.out)
        out.print(f"[green]saved[/] {escape(args.out)}  (inspect it: ouromamba-fx inspect {escape(args.out)})")
    if args.eval is not None:
        data, label = _data(args.eval or None)
        fp = evaluate(model, data, batch_size=args.batch_size, description="float")
        qr = evaluate(q, data, batch_size=args.batch_size, transform_model=model, description=args.config)
        out.print(_side_by_side({"eager": fp, args.config: qr}, label))
    return 0


def _depth(model) -> int | None:
    """Number of ``layers.N`` blocks of a float or quantized model (None: not a layered model)."""
    import re

    names = [n for n, _ in model.named_modules()]
    gm = getattr(model, "graph_module", None)
    if gm is not None:
        names += [str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
        names += [n.name for n in gm.graph.nodes]
    found = {int(m.group(1)) for n in names if (m := re.search(r"layers[._](\d+)[._]", n))}
    return max(found) + 1 if found else None


def _check_layer(layer: int | None, model) -> None:
    depth = _depth(model)
    if layer is not None and depth is not None and layer >= depth:
        raise UsageError(f"--layer {layer} is out of range: the model has layers 0..{depth - 1}")


def _check_passes(asked: list[str], passes: list[str]) -> None:
    unknown = [x for x in asked if x not in passes]
    if unknown:
        raise UsageError(f"--pass {unknown[0]!r}: no such pass; passes: {', '.join(passes)}")


def cmd_diff(args: argparse.Namespace) -> int:
    if len(args.passes) not in (0, 2):
        raise UsageError("diff: give two pass names (--pass A --pass B) or none")
    if args.quantized:
        _check_input(args.quantized, "--quantized")
        q = _load_quantized(args.quantized)
    else:
        from ouromamba_fx.config import preset
        from ouromamba_fx.convert import default_passes

        _check_passes(args.passes, ["capture"] + [p.name for p in default_passes(preset(args.config))])
        _check_calib(args)
        loaded = load_model(args)
        _check_layer(args.layer, loaded[0])  # before converting
        _, _, q = _convert(args, "bundled", loaded)
    _check_layer(args.layer, q)
    _check_passes(args.passes, q.passes)
    a, b = args.passes if args.passes else (None, None)
    out.print(q.diff(a, b, layer=args.layer, role=args.role, collapse=not args.no_collapse,
                     verbose=args.verbose))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ouromamba_fx.serialize import read_header

    _check_input(args.file, "file")
    _check_output(args.png, "--png")
    h = read_header(args.file)
    q = _load_quantized(args.file)
    ident = q.model_identity or {}
    t = Table(title=escape(str(args.file)), title_justify="left", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    cfg = ident.get("config") or {}
    arch = ", ".join(f"{k}={cfg[k]}" for k in ("img_size", "patch_size", "embed_dim", "depth", "d_state",
                                               "num_classes", "bimamba") if k in cfg)
    for k, v in [("format", f"{h.format} v{h.format_version} (ouromamba-fx {h.library_version}, "
                            f"torch {h.torch_version})"),
                 ("model", f"{q.model_name} ({ident.get('class', '?')})"),
                 ("architecture", arch or "?"),
                 ("weights fingerprint", (ident.get("fingerprint") or "?")[:16]),
                 ("input", f"(batch, {', '.join(map(str, q.input_shape))})" if q.input_shape else "any"),
                 ("config", _config_line(q.config)),
                 ("passes", " -> ".join(q.passes))]:
        t.add_row(k, escape(v))  # values from the file are shown as text, never as markup
    out.print(t)
    out.print(q.report())
    if args.outliers is not None or args.png:
        from ouromamba_fx.outliers import heatmap, save_png

        layer = _layer_arg(args.outliers if args.outliers is not None else "0")
        maps = q.outlier_map(layer)
        if args.outliers is not None:
            for site, m in maps.items():
                out.print(heatmap(m, site))
        if args.png:
            with _writing(args.png, "--png"):
                save_png(maps, args.png, f"{q.model_name} {q.config.name}: outlier channels, layer {layer}")
            out.print(f"[green]outlier map[/] -> {escape(args.png)}")
    return 0


def _layer_arg(v: str) -> int | str:
    return int(v) if v.isdigit() else v


def _config_line(c) -> str:
    parts = [f"{c.name}: W{c.weight.bits} {c.weight.granularity} ({c.weight.method}), "
             f"A{c.act.bits} {c.act.granularity} ({c.act.method})"]
    if c.outliers:
        parts.append(f"outliers {c.outliers.bits}-bit k={c.outliers.k}")
    if c.kscale:
        parts.append(f"k-scaled k={c.kscale.k}")
    if c.reparam:
        parts.append(f"state reparam S{c.reparam.state_bits}")
    if c.refine:
        parts.append(f"weight scales refined ({c.refine.iters} steps per mixer)")
    return ", ".join(parts)


def cmd_bench(args: argparse.Namespace) -> int:
    from ouromamba_fx import cpu_malloc
    from ouromamba_fx.latency import bench_latency

    _check_input(args.quantized, "--quantized")
    model, name = load_model(args)
    if args.quantized:
        q = _load_quantized(args.quantized, model)
    else:
        args.calib, args.limit_per_class = "bundled", 2
        _, _, q = _convert(args, "bundled")
    res = bench_latency(model, q, batch_size=args.batch_size, repeats=args.repeats,
                        threads=args.threads, compiled=args.compiled)
    out.print(res.table(f"{name} {q.config.name}"))
    for line in res.notes:
        out.print(f"[dim]{line}[/]")
    kept = cpu_malloc.applied()
    how = ("freed memory kept in the process (" + ", ".join(f"{k} = {v}" for k, v in kept.items()) + ")"
           if kept else "this process's C library defaults")
    out.print(f"[dim]malloc: {how}[/]")
    return 0


def cmd_gen(args: argparse.Namespace) -> int:
    from ouromamba_fx.gen import gen

    _check_output(args.out, "--out")
    _check_output(args.grid, "--grid")
    model, name = load_model(args)
    synth = gen(model, n=args.n, iters=args.iters, lr=args.lr, batch_size=args.batch_size,
                loss=args.loss, lambda_c=args.lambda_c, temperature=args.temperature,
                neighbourhood=args.neighbourhood, top_k=args.top_k, seed=args.seed)
    with _writing(args.out, "--out"):
        synth.save(args.out)
    s = synth.settings
    out.print(f"{name}: {len(synth.images)} synthetic images ({s['loss']} loss, {s['iters']} iterations, "
              f"{s['seconds']:.0f} s, {s['seconds_per_iter']:.2f} s/iteration) -> {args.out}; "
              f"the model predicts the target class for {100 * s['target_accuracy']:.1f}%")
    if args.grid:
        with _writing(args.grid, "--grid"):
            synth.grid(args.grid)
        out.print(f"image grid -> {args.grid}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import collections

    import torch

    from ouromamba_fx import export as ex

    _check_input(args.file, "file")
    _check_output(args.out, "--out")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    q = _load_quantized(args.file)
    if q.input_shape is None:
        raise UsageError(f"{args.file}: the model records no input shape to export for")
    model = q if args.reference else q.lower(target=args.device)
    example = torch.randn(2, *q.input_shape, generator=torch.Generator().manual_seed(0))
    if args.device == "cuda":
        model, example = model.to("cuda"), example.to("cuda")
    ep = model.export(example, max_batch=args.max_batch)
    counts = collections.Counter(n.target._opname for n in ep.graph.nodes if n.op == "call_function"
                                 and getattr(n.target, "namespace", None) == "ouromamba")
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none"
    out.print(f"exported the {'reference' if args.reference else 'lowered'} graph: batch 1..{args.max_batch}, "
              f"package ops: {escape(ops)}")
    meta = ex.metadata_of(q)
    with _writing(args.out, "--out"):
        if args.aoti:
            missing = ex.cpp_missing_ops(ep)
            path = ex.compile_aoti(ep, args.out, meta)
            out.print(f"[green]AOTInductor package ({args.device})[/] -> {escape(str(path))} "
                      f"({path.stat().st_size:,} bytes)")
            if missing:
                out.print(f"[yellow]runs from Python only:[/] no C++ kernel for {', '.join(missing)}; a C++ program "
                          f"cannot load this package (export the lowered graph, without --reference)")
        else:
            ex.save(ep, args.out, meta)
            out.print(f"[green]exported program[/] -> {escape(args.out)} ({Path(args.out).stat().st_size:,} bytes); "
                      f"load it with ouromamba_fx.export.load")
    return 0


def _add_convert_args(p: argparse.ArgumentParser, default_calib: str) -> None:
    from ouromamba_fx.gen import GenConfig

    GEN = GenConfig()

    _add_model_args(p)
    p.add_argument("--config", default="W8A8", type=_preset, help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--calib", default=None, metavar="SOURCE",
                   help=f"calibration: 'datafree' (OuroMamba-Gen synthetic images), 'bundled' (the bundled "
                        f"sample images), an image folder (<class>/*.jpg) or a .safetensors file from "
                        f"'ouromamba-fx gen' (default: {default_calib})")
    p.add_argument("--limit-per-class", type=POSITIVE, default=None, help="use at most N calibration images per class")
    p.add_argument("--gen-n", type=POSITIVE, default=GEN.n, help="data-free: number of synthetic images")
    p.add_argument("--gen-iters", type=NON_NEGATIVE, default=GEN.iters, help="data-free: optimisation steps per batch")
    p.add_argument("--seed", type=int, default=0, help="data-free: seed of the synthetic images")


def _sub(sub, name: str, help: str):
    return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ouromamba-fx", description="Data-free quantization of vision Mamba models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_eval, _add_convert, _add_inspect, _add_diff, _add_bench, _add_export, _add_gen):
        add(sub)
    return parser


def _add_eval(sub) -> None:
    p = _sub(sub, "eval", "top-1 accuracy on an image folder (<class>/*.jpg); float and quantized side by side")
    _add_model_args(p)
    p.add_argument("--data", default=None, help="image folder (default: the bundled sample)")
    p.add_argument("--quantized", default=None, metavar="FILE",
                   help="also evaluate this saved quantized model (made from the float model given)")
    p.add_argument("--batch-size", type=POSITIVE, default=128)
    p.add_argument("--limit-per-class", type=POSITIVE, default=None, help="use at most N images per class")
    p.add_argument("--traced", action="store_true", help="also evaluate the captured FX graph")
    p.set_defaults(fn=cmd_eval)


def _add_convert(sub) -> None:
    p = _sub(sub, "convert", "quantize a model, show its report, optionally save it")
    _add_convert_args(p, "datafree")
    p.add_argument("--out", default=None, metavar="FILE", help="save the quantized model (.safetensors)")
    p.add_argument("--eval", nargs="?", const="", default=None, metavar="FOLDER",
                   help="measure float and quantized top-1 on an image folder (no value: the bundled sample)")
    p.add_argument("--batch-size", type=POSITIVE, default=128)
    p.set_defaults(fn=cmd_convert)


def _add_inspect(sub) -> None:
    p = _sub(sub, "inspect", "show what a saved quantized model holds: config, report, outlier maps")
    p.add_argument("file", help="a .safetensors file written by 'convert --out' or QuantizedModel.save")
    p.add_argument("--outliers", nargs="?", const="0", default=None, metavar="LAYER",
                   help="terminal heat maps (time-step x channel) of a layer's outlier channels "
                        "(layer index or site name; no value: layer 0)")
    p.add_argument("--png", default=None, metavar="FILE",
                   help="write the outlier maps of that layer as a PNG (needs matplotlib: pip install 'ouromamba-fx[plot]')")
    p.set_defaults(fn=cmd_inspect)


def _add_diff(sub) -> None:
    p = _sub(sub, "diff", "show what each pass changed in the graph")
    _add_convert_args(p, "bundled")
    p.add_argument("--quantized", default=None, metavar="FILE",
                   help="diff the passes recorded in a saved model instead of converting")
    p.add_argument("--pass", dest="passes", action="append", default=[],
                   help="compare the graphs after these two passes (give twice)")
    p.add_argument("--layer", type=NON_NEGATIVE, default=None, help="only this layer")
    p.add_argument("--role", default=None, choices=ROLES, help="only this role")
    p.add_argument("--no-collapse", action="store_true", help="show every layer, even identical ones")
    p.add_argument("--verbose", action="store_true", help="also list constants (get_attr)")
    p.set_defaults(fn=cmd_diff)


def _add_bench(sub) -> None:
    p = _sub(sub, "bench", "latency on this machine: float vs quantized (and compiled with --compiled)")
    _add_model_args(p)
    p.add_argument("--quantized", default=None, metavar="FILE",
                   help="a saved quantized model (default: convert now with --config on bundled images)")
    p.add_argument("--config", default="W8A8", type=_preset,
                   help=f"preset, when no --quantized file is given: {', '.join(PRESETS)}")
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument("--repeats", type=POSITIVE, default=5, help="timed runs per model (the median is shown)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compiled", action="store_true",
                   help="also time torch.compile(q, backend='ouromamba') (fused integer kernels)")
    p.set_defaults(fn=cmd_bench)


def _add_export(sub) -> None:
    p = _sub(sub, "export", "export a saved quantized model for deployment: a torch.export program (.pt2) or, "
                            "with --aoti, an AOTInductor package runnable from Python and from C++ (examples/cpp)")
    p.add_argument("file", help="a .safetensors file written by 'convert --out' or QuantizedModel.save")
    p.add_argument("--out", required=True, metavar="FILE", help="the .pt2 file to write")
    p.add_argument("--aoti", action="store_true", help="compile the program with AOTInductor (needs a C++ compiler)")
    p.add_argument("--reference", action="store_true",
                   help="export the reference graph (quantize/dequantize ops) instead of the lowered, fused one")
    p.add_argument("--max-batch", type=POSITIVE, default=4096, help="largest batch the program accepts")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of the program (default: cpu)")
    p.set_defaults(fn=cmd_export)


def _add_gen(sub) -> None:
    from ouromamba_fx.gen import GenConfig

    GEN = GenConfig()
    p = _sub(sub, "gen", "generate data-free synthetic calibration images (OuroMamba-Gen)")
    _add_model_args(p)
    p.add_argument("--n", type=POSITIVE, default=GEN.n, help="number of images")
    p.add_argument("--iters", type=NON_NEGATIVE, default=GEN.iters, help="optimisation steps per batch")
    p.add_argument("--lr", type=_float(0.0, strict=True), default=GEN.lr, help="Adam learning rate")
    p.add_argument("--batch-size", type=POSITIVE, default=GEN.batch_size, help="images optimised together")
    p.add_argument("--loss", choices=("full", "output", "contrastive"), default=GEN.loss)
    p.add_argument("--lambda-c", type=_float(0.0, strict=False), default=GEN.lambda_c,
                   help="weight of the contrastive loss")
    p.add_argument("--temperature", type=_float(0.0, strict=True), default=GEN.temperature, help="InfoNCE temperature")
    p.add_argument("--neighbourhood", type=_odd, default=GEN.neighbourhood, help="odd p of the p x p patch neighbourhood")
    p.add_argument("--top-k", type=POSITIVE, default=GEN.top_k, help="positive patches per anchor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="synth.safetensors", help="where to save the images (.safetensors)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the images here")
    p.set_defaults(fn=cmd_gen)


def _error(prog: str, message: str) -> None:
    """One line on stderr: messages spanning lines (key lists) are joined, and never wrapped."""
    line = " ".join(str(message).split())
    err.print(Text.assemble((f"{prog}: error: ", "bold red"), line), soft_wrap=True, highlight=False)


MALLOC_ENV = "OUROMAMBA_FX_MALLOC"


def console(argv: list[str] | None = None) -> int:
    """The ``ouromamba-fx`` command. Its process is this tool's own, so glibc's malloc first keeps
    freed memory (:func:`ouromamba_fx.cpu_malloc.tune_malloc`: conversion and a lowered model's
    calls stop faulting pages in anew); ``OUROMAMBA_FX_MALLOC=default`` leaves the allocator as it
    is. Then :func:`main`, which leaves a Python caller's allocator alone."""
    from ouromamba_fx import cpu_malloc

    mode = os.environ.get(MALLOC_ENV, "tuned")
    if mode not in ("tuned", "default"):
        _error("ouromamba-fx", f"{MALLOC_ENV}={mode!r}: expected 'tuned' (the default) or 'default' "
                               "(the C library's malloc as it is)")
        return 2
    if mode == "tuned" and cpu_malloc._glibc() is not None:  # (elsewhere there is nothing to set)
        cpu_malloc.tune_malloc()
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    """Run a command; every user error (bad argument, unreadable file, unwritable output) is one
    line on stderr and exit code 2, with no traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or an argument error (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    prog = f"ouromamba-fx {args.command}"
    try:
        return args.fn(args)
    except OuroMambaError as e:
        _error(prog, str(e))
        return 2
    except OSError as e:  # a file the command reads or writes: permissions, a full disk...
        where = f" {e.filename!r}" if e.filename else ""
        _error(prog, f"{e.strerror or type(e).__name__}{where}" if e.strerror else f"{type(e).__name__}: {e}")
        return 2
    except KeyboardInterrupt:
        _error(prog, "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(console())
