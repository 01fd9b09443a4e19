"""The lab tests (`make lab-test`) use the suite's helpers: tests/conftest.py, loaded under another module name so
that `from conftest import ...` in this folder finds this file, and its fixtures registered here."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("mimref_suite_conftest",
                                               Path(__file__).resolve().parents[1] / "tests" / "conftest.py")
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)  # also puts the repository root on sys.path

ONE_THREAD, ROOT, TINY = _suite.ONE_THREAD, _suite.ROOT, _suite.TINY
run_script, write_mae_release_checkpoint = _suite.run_script, _suite.write_mae_release_checkpoint
one_thread = _suite.one_thread  # a fixture
