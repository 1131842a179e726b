"""Builds the web console's browser bundle (run by `make console`).

1. protoc-gen-es (console/node_modules) generates TypeScript from protos/ and from
   google/rpc/error_details.proto (ErrorInfo, RetryInfo; shipped by googleapis-common-protos)
   into console/src/gen/, with the same protoc as the Python stubs.
2. tsc type-checks console/src.
3. esbuild bundles console/src/main.ts into service/twofactor_service/console/static/console.js,
   which is committed, so `make run` needs no Node.js.

With `--check`, builds into a temporary folder and exits 1 when the committed bundle differs.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.rpc
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
CONSOLE = ROOT / "console"
GENERATED = CONSOLE / "src" / "gen"
BIN = CONSOLE / "node_modules" / ".bin"
BUNDLE = ROOT / "service" / "twofactor_service" / "console" / "static" / "console.js"


def generate() -> None:
    shutil.rmtree(GENERATED, ignore_errors=True)
    GENERATED.mkdir(parents=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    googleapis = Path(next(iter(google.rpc.__path__))).parent.parent
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("twofactor/**/*.proto"))
    args = [
        "protoc",
        f"--plugin=protoc-gen-es={BIN / 'protoc-gen-es'}",
        f"-I{PROTOS}",
        f"-I{googleapis}",
        f"-I{well_known}",
        f"--es_out={GENERATED}",
        "--es_opt=target=ts",
        *files,
        "google/rpc/error_details.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def bundle(out: Path) -> None:
    subprocess.run([str(BIN / "tsc"), "--noEmit", "-p", str(CONSOLE)], check=True)  # noqa: S603
    subprocess.run(  # noqa: S603 - our own build
        [
            str(BIN / "esbuild"),
            "src/main.ts",
            "--bundle",
            "--format=esm",
            "--target=es2022",
            "--charset=utf8",
            "--legal-comments=eof",
            f"--outfile={out}",
            "--log-level=warning",
        ],
        check=True,
        cwd=CONSOLE,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the bundle is stale")
    check = parser.parse_args().check
    generate()
    if not check:
        bundle(BUNDLE)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / BUNDLE.name
        bundle(fresh)
        if not BUNDLE.exists() or not filecmp.cmp(fresh, BUNDLE, shallow=False):
            print("stale console bundle, run `make console`", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
