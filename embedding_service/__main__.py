import sys

from embedding_service.launcher import main

sys.exit(main())
