"""Compile protos/twopc_pb/*.proto into the generated package twopc_pb/.

One command, run from anywhere: `python scripts/gen_protos.py`. With `--check` it
compiles into a temporary folder and fails if the committed code differs (CI runs
this so the generated package can never go stale).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "twopc_pb"


def compile_into(out: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out / PACKAGE / "__init__.py"
    init.write_text('"""Generated from protos/twopc_pb by scripts/gen_protos.py. Do not edit."""\n')
    return sorted((out / PACKAGE).iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if twopc_pb/ is stale")
    args = parser.parse_args()
    if not args.check:
        compile_into(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_into(Path(tmp))
        stale = [
            p.name
            for p in fresh
            if not (ROOT / PACKAGE / p.name).exists()
            or not filecmp.cmp(p, ROOT / PACKAGE / p.name, shallow=False)
        ]
        if stale:
            print(f"twopc_pb is stale ({', '.join(stale)}): run python scripts/gen_protos.py")
            return 1
    print("twopc_pb is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
