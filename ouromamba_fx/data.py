"""Image folders (``<class>/*.jpg``, ImageNet-val style) and the model's own preprocessing."""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config

from ouromamba_fx.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Largest image (pixels) read: its size is checked from the file's header before the pixels are
# decoded, so a small file declaring a huge image (a decompression bomb) is refused. PIL's own
# default warning threshold (89.5 M pixels, about 9500 x 9500).
MAX_IMAGE_PIXELS = 89_478_485


def bundled_samples() -> str:
    """Folder of the CIFAR-10 validation sample shipped with the package: 100 images per class,
    1,000 in all, the first 100 of each class of the project's validation split (files
    4500-4599). With 1,000 images one image is 0.1 point and the 95 % interval of a printed
    top-1 drop is a few tenths of a point; with the 200 shipped before it was +-1.5 points."""
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
        if limit_per_class is not None and (isinstance(limit_per_class, bool) or not isinstance(limit_per_class, int)
                                            or limit_per_class < 1):
            raise DataError(f"limit_per_class must be a whole number >= 1 (or None for all images), "
                            f"got {limit_per_class!r}")
        if self.root.is_file():
            raise DataError(f"image folder {str(root)!r} is a file; expected a folder of <class>/*.jpg")
        if not self.root.is_dir():
            raise DataError(f"image folder {str(root)!r} does not exist")
        try:
            folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError as e:
            raise DataError(f"image folder {str(root)!r} cannot be listed ({e.strerror or e})") from None
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
            try:
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            except OSError as e:
                raise DataError(f"{str(folder)!r} cannot be listed ({e.strerror or e})") from None
            self.samples += [(p, index[folder.name]) for p in files[:limit_per_class]]
        if not self.samples:
            raise DataError(f"{str(root)!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return (self.transform(read_image(path)) if self.transform else read_image(path)), label


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file as RGB; a :class:`DataError` naming the file if it cannot be read, is damaged
    or truncated, or declares more than ``max_pixels`` pixels (checked before decoding)."""
    try:
        with warnings.catch_warnings():
            # PIL warns (then errors at twice its limit) about huge images: an error here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DataError(f"image {str(path)!r} declares {w}x{h} pixels, more than the "
                                    f"{max_pixels} ouromamba_fx.data reads (a damaged file or a "
                                    f"decompression bomb); resize it or leave it out")
                return im.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {str(path)!r}: refused by PIL as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise DataError(f"image {str(path)!r} is not an image PIL can read (empty, damaged or another "
                        f"format); remove it or replace it") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated / corrupt data, unreadable file
        raise DataError(f"image {str(path)!r} cannot be read: {type(e).__name__}: {e}; the file is damaged "
                        f"or truncated (remove or replace it)") from None


def image_loader(model: torch.nn.Module, root: str | Path, batch_size: int = 128,
                 limit_per_class: int | None = None, num_workers: int = 0,
                 labels: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over ``root`` with ``model``'s preprocessing, in a fixed order.

    With ``labels=False`` it yields image batches only, ready to pass as ``calib``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"num_workers must be a whole number >= 0, got {num_workers!r}")
    classes = getattr(getattr(model, "cfg", None), "classes", None) or None
    ds = ImageFolder(root, model_transform(model), classes, limit_per_class)
    collate = None if labels else (lambda batch: torch.stack([x for x, _ in batch]))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers, collate_fn=collate)
