"""`python -m atom_stream serve|generate|bench` (the same as the `atom-stream` script)."""

from __future__ import annotations

import sys

from atom_stream.cli import main

if __name__ == "__main__":
    sys.exit(main())
