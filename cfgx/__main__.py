import sys

from cfgx.cli import main

sys.exit(main())
