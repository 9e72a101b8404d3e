"""`python -m emerdiff_fast ...` runs the command line (same as `emerdiff-fast ...`)."""
import sys

from .cli import main

sys.exit(main())
