"""Build hook, the only thing not in pyproject.toml: setuptools builds in a temporary folder, so that
`pip install .` (which builds in the source tree) leaves no build/ folder in the checkout."""

import atexit
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build import build


class TemporaryBuildBase(build):
    """setuptools' `build` with build_base (and with it bdist's folders) in a temporary folder, removed at exit."""

    def initialize_options(self):
        """The usual options, then a fresh temporary build_base."""
        super().initialize_options()
        self.build_base = tempfile.mkdtemp(prefix="vaeflow-build-")
        atexit.register(shutil.rmtree, self.build_base, ignore_errors=True)


setup(cmdclass={"build": TemporaryBuildBase})
