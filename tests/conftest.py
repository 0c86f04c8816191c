import sys
from pathlib import Path

# pytest runs with --import-mode=importlib, which does not put tests/ on sys.path; make `import helpers` work.
_TESTS = str(Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
