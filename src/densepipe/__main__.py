import sys

from densepipe.cli import main

sys.exit(main())
