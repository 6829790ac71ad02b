"""Tests of the upstream emulator."""
