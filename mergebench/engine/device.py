"""Turn a device name from the command line or a request into a usable ``torch.device``.

Checked before anything is opened, so a typo or a missing accelerator is one clear line
instead of a torch traceback halfway through a merge (or an evaluation).
"""

from __future__ import annotations

import torch

from ..errors import MergebenchError

__all__ = ["DeviceError", "resolve_device"]

_KNOWN = "use cpu, cuda, cuda:N or mps"


class DeviceError(MergebenchError, ValueError):
    """A device name that is malformed, unknown, or not available on this machine."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` as a ``torch.device`` that exists here.

    Raises :class:`DeviceError` (one line, naming the device) when the name is not a device
    torch knows, when this torch build has no CUDA (or MPS), or when ``cuda:N`` is past the
    last visible GPU.
    """
    text = str(name).strip()
    try:
        device = torch.device(text.lower())
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device {text!r}: {_KNOWN}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"--device {text}: {why}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {text}: only {count} CUDA device(s) visible (cuda:0 to cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"--device {text}: MPS is not available on this machine")
        return device
    raise DeviceError(f"unknown device {text!r}: {_KNOWN}")
