"""``python -m engine.cli``: the command line, as the ``multifd`` script runs it
(the demo starts its destination so)."""

from __future__ import annotations

import sys

from engine.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn imports it as __mp_main__
    sys.exit(main())
