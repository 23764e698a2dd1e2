from agentgate.cli import main

raise SystemExit(main())
