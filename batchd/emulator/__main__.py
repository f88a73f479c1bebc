"""``python -m batchd.emulator``: the same as ``batchd emulator``."""

from batchd.emulator.cli import emulator_command

if __name__ == "__main__":
    emulator_command(prog_name="python -m batchd.emulator")
