"""Generates the Python modules of node_service.proto and link.proto into generated/ (`make proto`).

    python -m exo_core.networking.proto_gen [OUT_DIR]

Uses grpcio-tools' bundled protoc, so the output depends only on the .proto and the
grpcio-tools version; the import in the gRPC module is made package-relative. A test
regenerates into a temporary folder and fails when the committed files are stale.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

PROTOS = ("node_service.proto", "link.proto")
GENERATED = Path(__file__).resolve().parent / "generated"
FILES = tuple(
    f"{proto.removesuffix('.proto')}{suffix}"
    for proto in PROTOS
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)
_INIT = '"""Code generated from node_service.proto and link.proto by `make proto`; do not edit."""\n'


def generate(out_dir: Path = GENERATED) -> list[Path]:
    """Run protoc on the .proto files, writing FILES (and an __init__.py) into out_dir."""
    from grpc_tools import protoc

    proto_dir = Path(__file__).resolve().parent
    include = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *PROTOS,
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTOS)} in {proto_dir} (exit {code})")
    for name in FILES:  # generated modules import each other package-relative
        module = out_dir / name
        text = module.read_text(encoding="utf-8")
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        module.write_text(text, encoding="utf-8")
    (out_dir / "__init__.py").write_text(_INIT, encoding="utf-8")
    return [out_dir / name for name in (*FILES, "__init__.py")]


_VERSION_STAMPS = (
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
)


def normalized(text: str) -> str:
    """Generated text without the tool-version stamps (which differ between grpcio-tools releases)."""
    for pattern in _VERSION_STAMPS:
        text = pattern.sub("<version>", text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0]) if args else GENERATED
    for path in generate(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
