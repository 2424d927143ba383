"""Read and write quantized files in tests, to build damaged or tampered ones."""

import json

from safetensors import safe_open
from safetensors.torch import save_file

from ouromamba_fx.fileformat import META_KEY, checksum


def read(path):
    """(tensors, header document) of a saved quantized model."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[META_KEY])


def write(path, tensors, doc, sign=True):
    """Write ``tensors`` and header ``doc``; ``sign``: make its checksum match (so the edit
    reaches the checks behind the checksum, as a deliberate edit would)."""
    if sign and isinstance(doc, dict):
        doc = dict(doc, checksum=checksum(doc, tensors))
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(doc)})
    return path


def rewrite(src, dst, doc_fn=None, tensors_fn=None, sign=True):
    tensors, doc = read(src)
    if doc_fn:
        doc_fn(doc)
    if tensors_fn:
        tensors_fn(tensors)
    return write(dst, tensors, doc, sign)
