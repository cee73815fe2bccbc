from eegfast.cli import main

raise SystemExit(main())
