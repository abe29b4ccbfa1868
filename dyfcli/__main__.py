"""`python -m dyfcli` runs the `dyf` command (so `torchrun -m dyfcli ...` works)."""

from dyfcli.cli import main

if __name__ == "__main__":
    main()
