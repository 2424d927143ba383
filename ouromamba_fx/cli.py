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
