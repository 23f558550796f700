"""``python -m worker`` is ``runcomfy-worker``."""

from worker.cli import main

main()
