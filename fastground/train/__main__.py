import sys

from fastground.train.cli import main

sys.exit(main())
