from pyvirtiofsd.supervisor.cli import main

raise SystemExit(main())
