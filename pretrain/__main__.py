import sys

from pretrain.run import main

sys.exit(main())
