# batchd's test fixtures: emulator, workspace, daemon.
pytest_plugins = ["batchd.testing"]
