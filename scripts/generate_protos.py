"""Regenerates the committed Python client code from protos/ (run by `make proto`).

With `--check`, generates into a temporary folder and exits 1 when the committed
code differs, so a stale checkout fails loudly.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
CLIENT = ROOT / "clients" / "python"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    # mypy-protobuf's plugins sit beside this interpreter, on PATH or not.
    plugins = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    check = parser.parse_args().check
    if not check:
        for stale in generated_files(CLIENT):
            (CLIENT / stale).unlink()
        generate(CLIENT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        expected, actual = generated_files(fresh), generated_files(CLIENT)
        differing = sorted(
            name
            for name in expected | actual
            if name not in expected
            or name not in actual
            or not filecmp.cmp(fresh / name, CLIENT / name, shallow=False)
        )
    if differing:
        print("stale generated code, run `make proto`: " + ", ".join(differing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
