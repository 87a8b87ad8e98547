from mlx_listen.app.cli import main

main()
