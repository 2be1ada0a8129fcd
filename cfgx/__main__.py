import sys

from cfgx.cli.commands import main

sys.exit(main())
