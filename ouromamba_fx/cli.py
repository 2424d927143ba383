"""The ``ouromamba-fx`` command line."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ouromamba_fx.config import PRESETS
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
  ouromamba-fx gen --n 64 --out synth.safetensors --grid synth.png      # synthetic calibration images
  ouromamba-fx eval --checkpoint vim_s.pth --model vim_small_patch16_224 --data imagenet/val
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="registered model name (default: the bundled reference vim_cifar_d128_l8)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file (hustvl/Vim .pth, state dict, or .safetensors)")


def load_model(args: argparse.Namespace):
    from ouromamba_fx import models

    if args.checkpoint:
        return models.load(args.checkpoint, name=args.model), args.model or args.checkpoint
    name = args.model or "vim_cifar_d128_l8"
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
    for col in ("model", "top-1 %", "vs float", "agreement with float", "img/s"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for kind, r in results.items():
        shown = "float" if kind == "eager" else kind
        delta = "" if kind == "eager" else f"{r.top1 - base.top1:+.2f}"
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


def _convert(args: argparse.Namespace, default_calib: str):
    import ouromamba_fx as of

    model, name = load_model(args)
    calib, gen_options, what = _calib(args, model, default_calib)
    out.print(f"converting {name} with {args.config}; calibration: {what}")
    config = of.config.preset(args.config)
    q = of.convert(model, calib=calib, config=config, gen_options=gen_options)
    return model, name, q


def cmd_convert(args: argparse.Namespace) -> int:
    from ouromamba_fx.evaluate import evaluate

    model, name, q = _convert(args, "datafree")
    out.print(q.report())
    if args.out:
        q.save(args.out)
        out.print(f"[green]saved[/] {escape(args.out)}  (inspect it: ouromamba-fx inspect {escape(args.out)})")
    if args.eval is not None:
        data, label = _data(args.eval or None)
        fp = evaluate(model, data, batch_size=args.batch_size, description="float")
        qr = evaluate(q, data, batch_size=args.batch_size, transform_model=model, description=args.config)
        out.print(_side_by_side({"eager": fp, args.config: qr}, label))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    if args.quantized:
        q = _load_quantized(args.quantized)
    else:
        _, _, q = _convert(args, "bundled")
    a, b = (args.passes + [None, None])[:2] if args.passes else (None, None)
    if (a is None) != (b is None):
        raise SystemExit("diff: give two pass names (--pass A --pass B) or none")
    out.print(q.diff(a, b, layer=args.layer, role=args.role, collapse=not args.no_collapse,
                     verbose=args.verbose))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ouromamba_fx.serialize import read_header

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
    return ", ".join(parts)


def cmd_bench(args: argparse.Namespace) -> int:
    from ouromamba_fx.bench import bench_latency

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
    return 0


def cmd_gen(args: argparse.Namespace) -> int:
    from ouromamba_fx.gen import gen

    model, name = load_model(args)
    synth = gen(model, n=args.n, iters=args.iters, lr=args.lr, batch_size=args.batch_size,
                loss=args.loss, lambda_c=args.lambda_c, temperature=args.temperature,
                neighbourhood=args.neighbourhood, top_k=args.top_k, seed=args.seed)
    synth.save(args.out)
    s = synth.settings
    out.print(f"{name}: {len(synth.images)} synthetic images ({s['loss']} loss, {s['iters']} iterations, "
              f"{s['seconds']:.0f} s, {s['seconds_per_iter']:.2f} s/iteration) -> {args.out}; "
              f"the model predicts the target class for {100 * s['target_accuracy']:.1f}%")
    if args.grid:
        synth.grid(args.grid)
        out.print(f"image grid -> {args.grid}")
    return 0


def _add_convert_args(p: argparse.ArgumentParser, default_calib: str) -> None:
    from ouromamba_fx.gen import DEFAULTS as GEN

    _add_model_args(p)
    p.add_argument("--config", default="W8A8", help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--calib", default=None, metavar="SOURCE",
                   help=f"calibration: 'datafree' (OuroMamba-Gen synthetic images), 'bundled' (the bundled "
                        f"sample images), an image folder (<class>/*.jpg) or a .safetensors file from "
                        f"'ouromamba-fx gen' (default: {default_calib})")
    p.add_argument("--limit-per-class", type=int, default=None, help="use at most N calibration images per class")
    p.add_argument("--gen-n", type=int, default=GEN["n"], help="data-free: number of synthetic images")
    p.add_argument("--gen-iters", type=int, default=GEN["iters"], help="data-free: optimisation steps per batch")
    p.add_argument("--seed", type=int, default=0, help="data-free: seed of the synthetic images")


def _sub(sub, name: str, help: str):
    return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ouromamba-fx", description="Data-free quantization of vision Mamba models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _sub(sub, "eval", "top-1 accuracy on an image folder (<class>/*.jpg); float and quantized side by side")
    _add_model_args(p)
    p.add_argument("--data", default=None, help="image folder (default: the bundled sample)")
    p.add_argument("--quantized", default=None, metavar="FILE",
                   help="also evaluate this saved quantized model (made from the float model given)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit-per-class", type=int, default=None, help="use at most N images per class")
    p.add_argument("--traced", action="store_true", help="also evaluate the captured FX graph")
    p.set_defaults(fn=cmd_eval)

    p = _sub(sub, "convert", "quantize a model, show its report, optionally save it")
    _add_convert_args(p, "datafree")
    p.add_argument("--out", default=None, metavar="FILE", help="save the quantized model (.safetensors)")
    p.add_argument("--eval", nargs="?", const="", default=None, metavar="FOLDER",
                   help="measure float and quantized top-1 on an image folder (no value: the bundled sample)")
    p.add_argument("--batch-size", type=int, default=128)
    p.set_defaults(fn=cmd_convert)

    p = _sub(sub, "inspect", "show what a saved quantized model holds: config, report, outlier maps")
    p.add_argument("file", help="a .safetensors file written by 'convert --out' or QuantizedModel.save")
    p.add_argument("--outliers", nargs="?", const="0", default=None, metavar="LAYER",
                   help="terminal heat maps (time-step x channel) of a layer's outlier channels "
                        "(layer index or site name; no value: layer 0)")
    p.add_argument("--png", default=None, metavar="FILE",
                   help="write the outlier maps of that layer as a PNG (needs matplotlib: pip install 'ouromamba-fx[plot]')")
    p.set_defaults(fn=cmd_inspect)

    p = _sub(sub, "diff", "show what each pass changed in the graph")
    _add_convert_args(p, "bundled")
    p.add_argument("--quantized", default=None, metavar="FILE",
                   help="diff the passes recorded in a saved model instead of converting")
    p.add_argument("--pass", dest="passes", action="append", default=[],
                   help="compare the graphs after these two passes (give twice)")
    p.add_argument("--layer", type=int, default=None, help="only this layer")
    p.add_argument("--role", default=None, help="only this role (in_proj, conv1d, x_proj, dt_proj, scan, out_proj)")
    p.add_argument("--no-collapse", action="store_true", help="show every layer, even identical ones")
    p.add_argument("--verbose", action="store_true", help="also list constants (get_attr)")
    p.set_defaults(fn=cmd_diff)

    p = _sub(sub, "bench", "latency on this machine: float vs quantized (and compiled, if the backend is there)")
    _add_model_args(p)
    p.add_argument("--quantized", default=None, metavar="FILE",
                   help="a saved quantized model (default: convert now with --config on bundled images)")
    p.add_argument("--config", default="W8A8", help=f"preset, when no --quantized file is given: {', '.join(PRESETS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model (the median is shown)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compiled", action="store_true",
                   help="also time torch.compile(q, backend='ouromamba') if the backend is installed")
    p.set_defaults(fn=cmd_bench)

    from ouromamba_fx.gen import DEFAULTS as GEN

    p = _sub(sub, "gen", "generate data-free synthetic calibration images (OuroMamba-Gen)")
    _add_model_args(p)
    p.add_argument("--n", type=int, default=GEN["n"], help="number of images")
    p.add_argument("--iters", type=int, default=GEN["iters"], help="optimisation steps per batch")
    p.add_argument("--lr", type=float, default=GEN["lr"], help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=GEN["batch_size"], help="images optimised together")
    p.add_argument("--loss", choices=("full", "output", "contrastive"), default=GEN["loss"])
    p.add_argument("--lambda-c", type=float, default=GEN["lambda_c"], help="weight of the contrastive loss")
    p.add_argument("--temperature", type=float, default=GEN["temperature"], help="InfoNCE temperature")
    p.add_argument("--neighbourhood", type=int, default=GEN["neighbourhood"], help="odd p of the p x p patch neighbourhood")
    p.add_argument("--top-k", type=int, default=GEN["top_k"], help="positive patches per anchor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="synth.safetensors", help="where to save the images (.safetensors)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the images here")
    p.set_defaults(fn=cmd_gen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except OuroMambaError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)  # messages hold [extras], paths
        return 2


if __name__ == "__main__":
    sys.exit(main())
