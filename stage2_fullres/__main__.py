import sys

from pipelines.cli import main

sys.exit(main(["stage2", *sys.argv[1:]]))
