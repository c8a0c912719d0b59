"""Generates the jobtoken.v1 stubs from the repository's proto/ directory at build time.

The generated modules go to src/jobtoken/v1/ (git-ignored), so a wheel and an editable
install both carry them. JOBTOKEN_PROTO_DIR overrides where the .proto files are.
"""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTOS = ["jobtoken/v1/jobtoken.proto", "jobtoken/v1/admin.proto"]


def generate() -> None:
    import grpc_tools
    from grpc_tools import protoc

    proto_dir = Path(os.environ.get("JOBTOKEN_PROTO_DIR", HERE.parent.parent / "proto"))
    if not all((proto_dir / p).is_file() for p in PROTOS):
        raise SystemExit(f"jobtoken-client: no {PROTOS[0]} under {proto_dir}; set JOBTOKEN_PROTO_DIR")
    out = HERE / "src"
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("jobtoken-client: protoc failed on " + " ".join(PROTOS))
    for package in (out / "jobtoken", out / "jobtoken" / "v1"):
        init = package / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from proto/ at build time; do not edit."""\n')


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate()
        # Packages found before generation do not include the generated ones.
        self.packages = sorted(set(self.packages or []) | {"jobtoken", "jobtoken.v1"})
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
