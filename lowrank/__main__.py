"""`python -m lowrank`: the `lowrank` command (`lowrank.cli`)."""

import sys

from lowrank.cli import main

sys.exit(main())
