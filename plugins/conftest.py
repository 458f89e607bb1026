"""The plugins' own tests (plugins/*/tests, collected with --import-mode=importlib so that two plugins may have
test files of the same name) get the isolation every test in tests/ gets."""

from tests.conftest import _isolated_config  # noqa: F401 - an autouse fixture, registered by being here
