import sys

from lorakit.cli import run

sys.exit(run())
