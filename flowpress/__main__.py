import sys

from flowpress.cli import main

sys.exit(main())
