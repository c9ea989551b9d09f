import sys

from ulfmpy.cli import main

sys.exit(main())
