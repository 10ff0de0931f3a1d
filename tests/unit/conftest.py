import sys
from pathlib import Path

# linux_replay and fake_shim are test helpers beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
