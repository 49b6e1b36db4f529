"""``python -m fused_tau``: the ``fused-tau`` command line (fused_tau.cli)."""
from .cli import main

raise SystemExit(main())
