"""`python -m cfrobust ...` and `torchrun -m cfrobust train ...` enter here."""

from cfrobust.cli.main import main

if __name__ == "__main__":
    main()
