import sys

from cfgx.cli.entry import main

sys.exit(main())
