import sys

from bias_probe.cli import main

sys.exit(main())
