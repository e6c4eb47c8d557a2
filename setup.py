"""cffi_modules still needs setup.py; the payload build hooks into build_py."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPayloads(build_py):
    """Assemble guest_payloads/*.S into kvmtest/payloads/ before packaging."""

    def run(self) -> None:
        path = ROOT / "kvmtest" / "payload_build.py"
        spec = importlib.util.spec_from_file_location("payload_build", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        try:
            mod.build_all(ROOT / "guest_payloads", ROOT / "kvmtest", ROOT / "kvmtest" / "payloads")
        except mod.PayloadBuildError as e:
            raise SystemExit(f"kvmtest: {e}") from None
        super().run()


setup(cffi_modules=["csrc/build_kvm.py:ffibuilder"], cmdclass={"build_py": BuildPayloads})
