from extrabalance.cli import main

raise SystemExit(main())
