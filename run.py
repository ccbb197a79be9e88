#!/usr/bin/env python
"""Stage 2 of FLARE: zero-shot, translate-test, translate-train LoRA, input-level fusion, FLARE and FLARE MT.

See ``python run.py --help`` and the README; the code is in ``src/flare/stage2.py``.
"""

import sys

from flare.stage2 import main

if __name__ == "__main__":
    sys.exit(main())
