from exo_core.cli import main

main()
