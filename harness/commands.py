"""Subcommands that fetch, build and boot (setup, build, boot)."""

from __future__ import annotations

import argparse


def add_subcommands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registered by harness.cli; filled as the build and machine layers land."""
