from dlmkern.doctor import main

raise SystemExit(main())
