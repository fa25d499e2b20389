import sys

from xmoe.cli import main

sys.exit(main())
