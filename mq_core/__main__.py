"""``python -m mq_core`` is the ``mq`` command."""

from mq_core.cli.main import main

main()
