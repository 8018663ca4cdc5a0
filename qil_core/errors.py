"""Typed errors of qil_core: each says what failed, on which input, expected vs got, and what to do."""

from __future__ import annotations


class QILError(Exception):
    """Base class of every error raised on purpose by qil_core."""


class InputError(QILError, ValueError):
    """A parameter, image, layer stack or prompt is out of range or malformed."""


class LayerIndexError(InputError, IndexError):
    """A layer was addressed by an index or name that the stack does not have."""


class WeightsError(QILError, ValueError):
    """A checkpoint file or folder cannot be used (wrong model, corrupt, missing keys, bad shapes)."""


class CorruptFileError(WeightsError):
    """A safetensors file is truncated, empty or not a safetensors file at all."""


class ModelMismatchError(WeightsError):
    """The file is a valid checkpoint of some other model or component."""


class ModelFileNotFoundError(QILError, FileNotFoundError):
    """A model file, folder, shard or tokenizer file is missing."""


class PSDError(QILError, ValueError):
    """A PSD cannot be written or read (limits, structure, unsupported features)."""


class OutputPathError(QILError, ValueError):
    """An output name or folder is unsafe, unwritable, or would overwrite an existing file."""


class OutputExistsError(OutputPathError, FileExistsError):
    """The target name is taken; the existing file was left untouched."""


class ResourceError(QILError, MemoryError):
    """Not enough RAM or device memory for the requested job; raised before allocating."""
