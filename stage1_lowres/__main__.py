import sys

from pipelines.cli import main

sys.exit(main(["stage1", *sys.argv[1:]]))
