"""Make the helper module `netgen` importable from every test module, and
register the hypothesis profiles: "quick" (the default: every run) and
"long" (ONNXLIP_HYPOTHESIS_PROFILE=long: thousands of examples per property)."""

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("quick", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("ONNXLIP_HYPOTHESIS_PROFILE", "quick"))
