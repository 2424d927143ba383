"""Image folders (``<class>/*.jpg``, ImageNet-val style) and the model's own preprocessing."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from ouromamba_fx.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def bundled_samples() -> str:
    """Folder of the small CIFAR-10 validation sample shipped with the package (20 per class)."""
    return str(resources.files("ouromamba_fx") / "assets" / "samples")


def model_transform(model: torch.nn.Module):
    """The evaluation transform the model expects (size, crop, mean/std from its pretrained_cfg)."""
    cfg = resolve_data_config({}, model=model)
    return create_transform(**cfg, is_training=False)


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root/<class>/``; labels follow ``class_names`` (the model's classes) if given,
    else the sorted folder names."""

    def __init__(self, root: str | Path, transform=None, class_names: list[str] | None = None,
                 limit_per_class: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {str(root)!r} does not exist")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise DataError(f"{str(root)!r} has no class sub-folders; expected <class>/*.jpg")
        names = [p.name for p in folders]
        if class_names:
            unknown = sorted(set(names) - set(class_names))
            if unknown:
                raise DataError(f"{str(root)!r}: folders {unknown} are not classes of the model "
                                f"({', '.join(class_names)})")
            index = {c: i for i, c in enumerate(class_names)}
        else:
            index = {c: i for i, c in enumerate(names)}
        self.samples: list[tuple[Path, int]] = []
        for folder in folders:
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            self.samples += [(p, index[folder.name]) for p in files[:limit_per_class]]
        if not self.samples:
            raise DataError(f"{str(root)!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        return (self.transform(img) if self.transform else img), label


def image_loader(model: torch.nn.Module, root: str | Path, batch_size: int = 128,
                 limit_per_class: int | None = None, num_workers: int = 0,
                 labels: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over ``root`` with ``model``'s preprocessing, in a fixed order.

    With ``labels=False`` it yields image batches only, ready to pass as ``calib``.
    """
    classes = getattr(getattr(model, "cfg", None), "classes", None) or None
    ds = ImageFolder(root, model_transform(model), classes, limit_per_class)
    collate = None if labels else (lambda batch: torch.stack([x for x, _ in batch]))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers, collate_fn=collate)
