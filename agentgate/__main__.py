"""``python -m agentgate``: the command line.

Imports: cli.
"""

from agentgate.cli import main

raise SystemExit(main())
