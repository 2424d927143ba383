"""The library's version and the names of the files it writes.

Each file format is read by its own module (quantized models: :mod:`ouromamba_fx.fileformat`,
synthetic calibration sets: :class:`ouromamba_fx.gen.SyntheticCalib`); the float-checkpoint reader
(:mod:`ouromamba_fx.models.loader`) only needs their names, to refuse them with a pointer to the
right loader.
"""

__version__ = "0.1.0"

#: A quantized model (``.safetensors``): its JSON header sits under this metadata key.
QUANTIZED_META_KEY = "ouromamba_fx"
QUANTIZED_FORMAT = "ouromamba_fx.quantized"
QUANTIZED_FORMAT_VERSION = 2
#: Synthetic calibration images written by ``SyntheticCalib.save`` (metadata ``format``).
SYNTHETIC_FORMAT = "ouromamba_fx.SyntheticCalib/1"
