"""The wire between the kernel shim and the software module (docs/transport.md)."""
