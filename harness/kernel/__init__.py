"""Getting a kernel to boot: fetch the source, apply the shim, configure, build, inspect."""
