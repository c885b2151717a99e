"""``python -m hub_msif`` runs the ``hub-msif`` command line (used by ``accelerate launch -m hub_msif``)."""

import sys

from hub_msif.apps.cli import main

sys.exit(main())
