"""What of the host the sandbox shows: only an allow-list (/usr and its
links, a minimal /etc, the interpreter's prefixes, the REPL script alone),
and no more; while real work (numpy, torch, matplotlib, sqlite3) still runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.test_gateway import Stream, gateway_stub, last, results
from tool_gateway.config import GatewayConfig

PROJECT = Path(__file__).resolve().parent.parent
# Folders shown whole (or made: /tmp, /dev, /proc), and the interpreter's.
SHOWN = {"/usr", "/tmp", "/dev", "/proc", "/conveyor"}
PREFIXES = {
    p
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    for p in (os.path.abspath(prefix), os.path.realpath(prefix))
}
LINKS_OR_FOLDERS = {"/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"}
ETC = {
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf",
    "alternatives", "fonts", "passwd", "group",
}  # fmt: skip


@pytest.fixture(scope="module")
async def stub():
    async with gateway_stub(GatewayConfig(unit_timeout=90.0)) as stub:
        yield stub


async def values(stub, *units: str) -> list[str]:
    stream = Stream(stub)
    events = await stream.run("v", *units)
    await stream.end()
    outcomes = results(events)
    assert len(outcomes) == len(units), last(events)
    assert all(o.ok for o in outcomes), [o.exception for o in outcomes if not o.ok]
    return [o.value for o in outcomes]


def allowed(path: str) -> bool:
    """Inside something shown, or a folder on the way to it."""
    roots = SHOWN | PREFIXES | LINKS_OR_FOLDERS | {f"/etc/{name}" for name in ETC}
    return any(
        path == root or path.startswith(root + "/") or root.startswith(path.rstrip("/") + "/")
        for root in roots
    )


async def test_host_files_outside_the_allow_list_are_not_there(stub):
    secrets = [
        PROJECT / "README.md",
        PROJECT / ".git",
        PROJECT / "tool_gateway" / "sandbox.py",
        PROJECT / "tool_gateway" / "python_repl.py",
        Path(__file__).resolve(),
        "/etc/ssh",
        "/etc/shadow",
        "/etc/hostname",
        "/var/log",
        "/root/.bashrc",
        "/home",
        "/opt",
        "/srv",
        "/mnt",
        "/sys",
    ]
    (present,) = await values(
        stub, f"[p for p in {[str(p) for p in secrets]!r} if __import__('os').path.lexists(p)]"
    )
    assert present == "[]"


WALK = """
import os
def everything():
    '''Every path of the sandbox outside the folders shown whole.'''
    found, todo = [], ['/']
    while todo:
        folder = todo.pop()
        for entry in os.scandir(folder):
            found.append(entry.path)
            if entry.is_dir(follow_symlinks=False) and entry.path not in SKIP:
                todo.append(entry.path)
    return sorted(found)
"""


async def test_the_whole_tree_holds_only_the_allow_list(stub):
    shown_whole = (SHOWN - {"/conveyor"}) | PREFIXES
    skip = sorted(shown_whole | {"/etc/alternatives", "/etc/ld.so.conf.d", "/etc/fonts"})
    _, tree, repl = await values(
        stub, f"SKIP = {skip!r}\n{WALK}", "everything()", "os.listdir('/conveyor')"
    )
    paths = eval(tree)  # a list's repr
    assert "/etc/passwd" in paths and "/conveyor/python_repl.py" in paths
    assert [p for p in paths if not allowed(p)] == []
    assert repl == "['python_repl.py']"  # the script alone, not the project around it


async def test_passwd_and_group_name_only_root_and_nobody(stub):
    passwd, group = await values(stub, "open('/etc/passwd').read()", "open('/etc/group').read()")
    assert [line.split(":")[0] for line in eval(passwd).splitlines()] == ["root", "nobody"]
    assert [line.split(":")[0] for line in eval(group).splitlines()] == ["root", "nogroup"]


async def test_mountinfo_names_no_host_path_outside_the_allow_list(stub):
    (mountinfo,) = await values(stub, "open('/proc/self/mountinfo').read()")
    for line in eval(mountinfo).splitlines():
        fields = line.split()
        root, mount_point = fields[3], fields[4]
        fstype = fields[fields.index("-") + 1]
        assert allowed(mount_point), line
        if fstype not in ("tmpfs", "proc", "devtmpfs", "devpts", "mqueue"):
            assert allowed(root), line  # a bind of a host path: an allowed one
        assert not root.startswith(str(PROJECT) + "/") or any(
            root.startswith(p) for p in PREFIXES
        ), line


async def test_real_work_runs_in_the_sandbox(stub):
    for module in ("numpy", "torch", "matplotlib"):
        pytest.importorskip(module)  # the sandbox has the gateway's interpreter
    found = await values(
        stub,
        "import json, sqlite3, subprocess\n"
        "import numpy, torch\n"
        "import matplotlib\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n",
        "float(numpy.arange(4).sum()), float(torch.ones(3).sum())",
        "plt.plot([1, 2, 3]); plt.savefig('/tmp/plot.png')",
        "open('/tmp/plot.png', 'rb').read(4)",
        "sqlite3.connect(':memory:').execute('select 40 + 2').fetchone()[0]",
        "json.loads(subprocess.run(['echo', '[1]'], capture_output=True, text=True).stdout)",
    )
    assert found[1:] == ["(6.0, 3.0)", "", "b'\\x89PNG'", "42", "[1]"]
