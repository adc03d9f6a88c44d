from coarse2fine.cli import main

raise SystemExit(main())
