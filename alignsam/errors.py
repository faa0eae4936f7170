"""Named exceptions for errors a user can cause. Each message says what to do about it."""

from __future__ import annotations


class AlignSamError(Exception):
    """Base class of every error `alignsam` raises on purpose."""


class CheckpointError(AlignSamError):
    """A model checkpoint is missing, unreadable, or made for another architecture."""


class ImageError(AlignSamError):
    """An image cannot be read or has an unusable shape."""


class BundleError(AlignSamError):
    """A policy bundle is missing, corrupt, or made for another SAM model."""


class DataError(AlignSamError):
    """Training or evaluation data is missing or inconsistent (unpaired files, wrong mask size...)."""
