"""Fault-injection helpers shared by the engine and CLI fault tests."""

from __future__ import annotations

import errno
import os


class FullDisk:
    """A file whose writes fail with ENOSPC past ``budget`` bytes, and whose close (the final
    flush) fails too, as on a full disk."""

    def __init__(self, f, budget: int):
        self.f, self.budget, self.written = f, budget, 0

    def _full(self) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

    def write(self, data):
        n = getattr(data, "nbytes", None) or len(data)
        if self.written + n > self.budget:
            raise self._full()
        self.written += n
        return self.f.write(data)

    def close(self):
        self.f.close()
        raise self._full()


def fill_disk(monkeypatch, budget: int) -> None:
    """Every file the output writer opens from now on behaves like :class:`FullDisk`."""
    import mergebench.engine.writer as writer_module

    monkeypatch.setattr(writer_module, "open", lambda *a, **k: FullDisk(open(*a, **k), budget), raising=False)


def private_tmpfs(tmp_path, size: str):
    """A folder under ``tmp_path`` on which a ``size`` tmpfs can be mounted in a private user+mount
    namespace (``unshare -rm sh -c "mount -t tmpfs -o size=SIZE tmpfs DIR && ..."``: it affects
    nobody else); the test is skipped where unprivileged namespaces or the mount are not allowed."""
    import shutil
    import subprocess

    import pytest

    if not shutil.which("unshare"):
        pytest.skip("no unshare(1)")
    mnt = tmp_path / "tiny_fs"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.strip()}")
    return mnt
