"""Named errors a user (or Label Studio) can cause.

Every error carries a message that says what to do, and an HTTP status the web layer uses when the error
reaches a route. Per-task errors (an image that cannot be fetched) never reach a route: the task gets an empty
prediction and the reason is logged.
"""

from __future__ import annotations


class MLBackendError(Exception):
    """Base class of every error ``ml_backend`` raises on purpose."""

    http_status: int = 400


class BadRequestError(MLBackendError):
    """The request body is not what Label Studio sends (malformed JSON, missing fields)."""


class LabelConfigError(MLBackendError):
    """The project's labelling config cannot be served by this backend."""


class FormatError(MLBackendError):
    """A Label Studio result (brush RLE, polygon) is malformed or uses an unsupported option."""


class AuthError(MLBackendError):
    """Missing or wrong credentials."""

    http_status = 401


class ImageFetchError(MLBackendError):
    """A task's image could not be used. The task gets an empty prediction; the message is logged."""

    http_status = 422


class DisallowedHostError(ImageFetchError):
    """The image URL points at a host that is neither the Label Studio host nor an allowed image host."""


class ImageUnreachableError(ImageFetchError):
    """The image could not be downloaded (connection refused, timeout, HTTP error)."""


class ImageTooLargeError(ImageFetchError):
    """The image file or its pixel count is above the configured limits (decompression-bomb guard)."""


class NotAnImageError(ImageFetchError):
    """The downloaded file is not an image PIL can read."""


class DisallowedPathError(DisallowedHostError):
    """The URL is on the Label Studio host but not on a path Label Studio serves images from (the token goes
    only there)."""


class OutsideUploadDirError(ImageFetchError):
    """A file under LABEL_STUDIO_UPLOAD_DIR resolves (through a symlink or ``..``) to a place outside it."""


class SetupRefusedError(BadRequestError):
    """A /setup that would send the stored Label Studio token to another host, or names a host that is not
    allowed (not http(s), private or loopback without SETUP_ALLOW_PRIVATE_HOSTS, or not resolvable)."""
