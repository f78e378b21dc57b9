"""Generate the gRPC stubs of ``protos/ecomrec/v1/*.proto`` into ``serving/_generated/``.

Run ``python -m serving.gen_protos`` (the Makefile and CI do) with the pinned
``grpcio-tools``; the output is git-ignored and reproducible.  protoc writes absolute
imports (``from ecomrec.v1 import recommend_pb2``) that would collide with our own
``ecomrec`` package, so they are rewritten to ``serving._generated.ecomrec.v1``.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "serving" / "_generated"
PACKAGE = "serving._generated"


def generate(proto_dir: Path = PROTO_DIR, out_dir: Path = OUT_DIR) -> list[Path]:
    """Run protoc over every .proto under ``proto_dir``; returns the written .py files."""
    from grpc_tools import protoc  # pinned grpcio-tools; heavy, imported on use

    protos = sorted(proto_dir.rglob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_dir}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(proto_dir)) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    written = sorted(out_dir.rglob("*.py"))
    top_packages = {p.relative_to(proto_dir).parts[0] for p in protos}
    pattern = re.compile(rf"^from ({'|'.join(map(re.escape, top_packages))})(\.|\s)", re.M)
    for f in [*written, *out_dir.rglob("*.pyi")]:
        text = f.read_text()
        f.write_text(pattern.sub(rf"from {PACKAGE}.\1\2", text))
    for d in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    log.info("generated %d files into %s", len(written), out_dir)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protos", type=Path, default=PROTO_DIR)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generate(a.protos, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
