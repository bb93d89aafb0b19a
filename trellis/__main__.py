import sys

from trellis.engine.process_tree import adopt_parent_death

adopt_parent_death()  # a rank spawned by `trellis train`: die with the parent

from trellis.cli import main  # noqa: E402

sys.exit(main())
