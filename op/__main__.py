"""`python -m op`: build the CUDA ops now, e.g. before torchrun (see op/build.py)."""
import sys

from .build import main

sys.exit(main())
