import sys

from phiforge.cli import main

sys.exit(main())
