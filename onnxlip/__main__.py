"""`python -m onnxlip`: the same command line as `onnxlip`."""

import sys

from .cli import main

sys.exit(main())
