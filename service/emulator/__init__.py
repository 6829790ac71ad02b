"""An in-process stand-in for the ElevenLabs convai API, for `convai-gateway dev`, tests and the benchmark.

Production code never imports this package.
"""

from __future__ import annotations

from service.emulator.app import Emulator, create_emulator_app
from service.emulator.samples import FAKE_SECRETS, audio_bytes, new_conversation_id

__all__ = ["FAKE_SECRETS", "Emulator", "audio_bytes", "create_emulator_app", "new_conversation_id"]
