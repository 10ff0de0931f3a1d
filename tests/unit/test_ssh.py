"""SSH target URLs (--target), without a server."""

from __future__ import annotations

import pytest

from harness.machine.ssh import SshTarget


def test_target_urls():
    assert SshTarget.parse("ssh://me@host.example:2222") == SshTarget("host.example", "me", 2222)
    assert str(SshTarget.parse("ssh://10.0.0.7")) == "ssh://root@10.0.0.7:22"
    for bad in ("http://host", "ssh://", "ssh://a@b@c", "ssh://host:port"):
        with pytest.raises(ValueError, match="expected ssh://user@host"):
            SshTarget.parse(bad)
