"""convai-gateway: a backend-for-frontend for the ElevenLabs Conversational AI API."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("convai-gateway")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
