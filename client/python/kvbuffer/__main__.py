import sys

from kvbuffer.cli import main

sys.exit(main())
