"""`python cli.py ...` from a checkout runs `mlx-listen ...`: the click layer lives in `mlx_listen/cli/`
(one module per command group), installed with the package as the `mlx-listen` entry point."""

from mlx_listen.cli import main

if __name__ == "__main__":
    main()
