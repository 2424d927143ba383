"""Rebuild the package's bundled assets from the project's shared data.

    python tools/bundle_reference.py --shared ../shared

Writes ``ouromamba_fx/assets/vim_cifar_d128_l8.{safetensors,json}`` (the reference checkpoint,
converted so that loading it never unpickles anything) and ``ouromamba_fx/assets/samples/``
(the first ``--per-class`` validation images of each class, for the README's demo).
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shared", default="../shared", help="folder holding models/ and data/")
    ap.add_argument("--per-class", type=int, default=100)
    args = ap.parse_args()
    shared = Path(args.shared)
    assets = Path(__file__).resolve().parents[1] / "ouromamba_fx" / "assets"
    assets.mkdir(exist_ok=True)

    ck = torch.load(shared / "models" / "vim_cifar_d128_l8.pt", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in ck["model"].items()}, str(assets / "vim_cifar_d128_l8.safetensors"))
    meta = {k: ck[k] for k in ("config", "val_acc", "classes", "mean", "std", "epoch")}
    meta["source"] = "vim_cifar_d128_l8.pt (project reference checkpoint, CIFAR-10)"
    (assets / "vim_cifar_d128_l8.json").write_text(json.dumps(meta, indent=1) + "\n")

    samples = assets / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    for cls_dir in sorted(p for p in (shared / "data" / "cifar10" / "val").iterdir() if p.is_dir()):
        (samples / cls_dir.name).mkdir(parents=True)
        for img in sorted(cls_dir.glob("*.jpg"))[: args.per_class]:
            shutil.copy(img, samples / cls_dir.name / img.name)
    print(f"wrote {assets}")


if __name__ == "__main__":
    main()
