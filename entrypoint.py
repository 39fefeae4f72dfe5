#!/usr/bin/env python3
"""Container entrypoint: hands everything to the package CLI (`sana-appliance`)."""

import sys

from sana_appliance.cli import main

if __name__ == "__main__":
    sys.exit(main())
