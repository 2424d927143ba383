"""The ``ouromamba-fx`` command line."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from ouromamba_fx.errors import OuroMambaError

out = Console()
err = Console(stderr=True)

EXAMPLES = """examples:
  ouromamba-fx eval                                   # bundled reference Vim on the bundled sample
  ouromamba-fx convert --config W8A8 --calib path/to/calib --eval path/to/val
  ouromamba-fx diff --layer 3 --role x_proj           # what each pass did to layer 3's x_proj
  ouromamba-fx eval --data path/to/val                # top-1 on an ImageNet-val style folder
  ouromamba-fx eval --checkpoint vim_s.pth --model vim_small_patch16_224 --data imagenet/val
  ouromamba-fx eval --traced                          # through the captured torch.fx graph
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


def cmd_eval(args: argparse.Namespace) -> int:
    from ouromamba_fx.capture import capture, scan_nodes
    from ouromamba_fx.data import bundled_samples
    from ouromamba_fx.evaluate import evaluate

    model, name = load_model(args)
    data = args.data or bundled_samples()
    label = "bundled sample" if args.data is None else data
    runs = [("eager", model)]
    if args.traced:
        gm = capture(model)
        out.print(f"captured {name}: {len(gm.graph.nodes)} nodes, {len(scan_nodes(gm))} scan nodes")
        runs.append(("traced", gm))
    results = {}
    for kind, m in runs:
        r = evaluate(m, data, batch_size=args.batch_size, limit_per_class=args.limit_per_class,
                     transform_model=model, description=f"{name} ({kind})")
        results[kind] = r
        out.print(r.summary(f"{name} ({kind})", label))
    if "traced" in results:
        out.print(f"traced vs eager: top-1 agreement "
                  f"{results['traced'].agreement(results['eager']):.2f}%")
    return 0


def _convert(args: argparse.Namespace):
    import ouromamba_fx as of
    from ouromamba_fx.data import bundled_samples, image_loader

    model, name = load_model(args)
    calib_dir = args.calib or bundled_samples()
    calib = image_loader(model, calib_dir, batch_size=100, limit_per_class=args.limit_per_class,
                         labels=False)
    config = of.config.preset(args.config)
    q = of.convert(model, calib=calib, config=config)
    return model, name, q


def cmd_convert(args: argparse.Namespace) -> int:
    from ouromamba_fx.evaluate import evaluate

    from ouromamba_fx.data import bundled_samples

    model, name, q = _convert(args)
    out.print(q.report())
    if args.eval is not None:
        label = args.eval or "bundled sample"
        args.eval = args.eval or bundled_samples()
        fp = evaluate(model, args.eval, batch_size=args.batch_size, description="float")
        qr = evaluate(q, args.eval, batch_size=args.batch_size, transform_model=model,
                      description=args.config)
        out.print(fp.summary(f"{name} float", label))
        out.print(qr.summary(f"{name} {args.config}", label))
        out.print(f"agreement with float: {qr.agreement(fp):.2f}%")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    _, _, q = _convert(args)
    a, b = (args.passes + [None, None])[:2] if args.passes else (None, None)
    if (a is None) != (b is None):
        raise SystemExit("diff: give two pass names (--pass A --pass B) or none")
    out.print(q.diff(a, b, layer=args.layer, role=args.role, collapse=not args.no_collapse,
                     verbose=args.verbose))
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


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--config", default="W8A8", help="preset: W8A8, W6A6, W4A8, W4A4O8, W8A8-RTN, W8A8-per-token")
    p.add_argument("--calib", default=None, help="calibration image folder (default: the bundled sample)")
    p.add_argument("--limit-per-class", type=int, default=None, help="use at most N calibration images per class")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ouromamba-fx", description="Data-free quantization of vision Mamba models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="top-1 accuracy on an image folder (<class>/*.jpg)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--data", default=None, help="image folder (default: the bundled sample)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit-per-class", type=int, default=None, help="use at most N images per class")
    p.add_argument("--traced", action="store_true", help="also evaluate the captured FX graph")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("convert", help="quantize a model and show its report",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_convert_args(p)
    p.add_argument("--eval", nargs="?", const="", default=None, metavar="FOLDER",
                   help="measure float and quantized top-1 on an image folder (no value: the bundled sample)")
    p.add_argument("--batch-size", type=int, default=128)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("diff", help="show what each pass changed in the graph",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_convert_args(p)
    p.add_argument("--pass", dest="passes", action="append", default=[],
                   help="compare the graphs after these two passes (give twice)")
    p.add_argument("--layer", type=int, default=None, help="only this layer")
    p.add_argument("--role", default=None, help="only this role (in_proj, conv1d, x_proj, dt_proj, scan, out_proj)")
    p.add_argument("--no-collapse", action="store_true", help="show every layer, even identical ones")
    p.add_argument("--verbose", action="store_true", help="also list constants (get_attr)")
    p.set_defaults(fn=cmd_diff)

    from ouromamba_fx.gen import DEFAULTS as GEN

    p = sub.add_parser("gen", help="generate data-free synthetic calibration images (OuroMamba-Gen)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
