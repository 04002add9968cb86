import sys

from amp_prune.cli import main

sys.exit(main())
