"""Generates the public API's stubs into conveyor_client/_proto/v1 at build
time, so users never run protoc. Only common.proto and conveyor.proto: the
public service needs no internal file. protoc writes absolute imports of
`conveyor.v1`; they are pointed at this package, which owns its copy."""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
PROTOS = HERE.parents[1] / "protos"
FILES = ["conveyor/v1/common.proto", "conveyor/v1/conveyor.proto"]


def generate(out: Path) -> None:
    from grpc_tools import protoc

    target = out / "conveyor_client" / "_proto"
    gen = target / "_gen"
    gen.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTOS}", f"--python_out={gen}", f"--pyi_out={gen}"]
    args += [f"--grpc_python_out={gen}", *(str(PROTOS / f) for f in FILES)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {FILES} in {PROTOS}")
    v1 = target / "v1"
    v1.mkdir(exist_ok=True)
    (target / "__init__.py").write_text('"""Generated stubs of conveyor.v1."""\n')
    (v1 / "__init__.py").write_text("")
    for path in sorted((gen / "conveyor" / "v1").iterdir()):
        ours = "from conveyor_client._proto.v1 import"
        text = re.sub(r"\bfrom conveyor\.v1 import\b", ours, path.read_text())
        (v1 / path.name).write_text(text)
    for path in sorted(gen.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    gen.rmdir()


# Into the source tree (git-ignored), so wheels, sdists and editable
# installs all carry the stubs.
generate(HERE)
setup()
