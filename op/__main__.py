"""`python -m op`: compile check of the CUDA sources (see op/build.py)."""
from .build import main

main()
