"""Build hook (the rest of the packaging is in pyproject.toml): every wheel carries the gRPC
stubs.  ``serving/_generated`` is git-ignored and made by ``python -m serving.gen_protos``;
a build from a checkout without it generates it from ``protos/`` with the pinned
grpcio-tools (a build requirement) into the wheel's build directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithStubs(build_py):
    """``build_py`` plus ``serving/_generated`` when the source tree has none."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install imports the source tree's stubs (make protos)
        out = Path(self.build_lib) / "serving" / "_generated"
        if (out / "ecomrec" / "v1" / "recommend_pb2.py").exists():
            return  # copied from the source tree
        # load the generator by path: importing the `serving` package needs its dependencies
        spec = importlib.util.spec_from_file_location(
            "_gen_protos", ROOT / "serving" / "gen_protos.py"
        )
        assert spec is not None and spec.loader is not None
        gen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gen)
        gen.generate(ROOT / "protos", out)


setup(cmdclass={"build_py": BuildPyWithStubs})
