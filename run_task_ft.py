"""Stage 1 of FLARE: LoRA fine-tuning of a pretrained model on English task data (see flare.stage1)."""

import sys

from flare.stage1 import build_parser, main  # noqa: F401  (build_parser: for --help tooling)

if __name__ == "__main__":
    sys.exit(main())
