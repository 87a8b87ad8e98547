from mlx_listen.cli import main

main()
