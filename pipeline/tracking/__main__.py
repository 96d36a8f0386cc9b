"""``python -m pipeline.tracking upload FILE [--uri URI]`` (see :mod:`pipeline.tracking.upload`)."""

import sys

from pipeline.tracking.upload import main

if __name__ == "__main__":
    sys.exit(main())
