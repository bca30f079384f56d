"""Build hooks: ship the wire contract and generate its Python modules with grpcio-tools.

Metadata lives in pyproject.toml. `build_py` copies proto/kvbuffer/v1/attention_service.proto into the
package (when building from a checkout) and runs grpc_tools.protoc into the build folder, so the wheel
holds modules made by the grpcio-tools of the build environment. Install with
`pip install --no-build-isolation .` to generate them with the grpcio-tools that sits beside the
framework's own grpcio/protobuf; the package regenerates or falls back at import time otherwise.
"""
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))


def _codegen():
    spec = importlib.util.spec_from_file_location(
        "_kvb_codegen", os.path.join(HERE, "kvbuffer", "_codegen.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPy(build_py):
    def run(self):
        cg = _codegen()
        pkg = os.path.join(HERE, "kvbuffer")
        cg.sync_proto(pkg)
        super().run()
        if not self.editable_mode:
            cg.generate(self.build_lib, pkg)
        else:  # editable install: generate next to the sources
            cg.generate(HERE, pkg)


class SDist(sdist):
    def run(self):
        _codegen().sync_proto(os.path.join(HERE, "kvbuffer"))
        super().run()


setup(cmdclass={"build_py": BuildPy, "sdist": SDist})
