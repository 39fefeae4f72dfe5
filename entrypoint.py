#!/usr/bin/env python3
"""Container entrypoint: hands everything to the package CLI (`sana-appliance`)."""

from sana_appliance.cli import leave, main

if __name__ == "__main__":
    leave(main())
