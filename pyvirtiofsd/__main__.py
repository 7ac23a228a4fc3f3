from pyvirtiofsd.supervisor.main import main

raise SystemExit(main())
