"""What runs in the guest, built from images/: the initramfs."""

from harness.images.initramfs import InitramfsError, InitramfsRequest, build_initramfs

__all__ = ["InitramfsError", "InitramfsRequest", "build_initramfs"]
