import sys
from pathlib import Path

from hypothesis import settings

# linux_replay and fake_shim are test helpers beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

# No per-example time limit: hypothesis's default (200 ms) made a property test fail on a host
# busy with emulators (test_every_single_byte_corruption_is_rejected, during a Bochs sweep).
# Timings are measured in benchmarks, never as pass/fail limits.
settings.register_profile("harness", deadline=None)
settings.load_profile("harness")
