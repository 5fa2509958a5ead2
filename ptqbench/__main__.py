from ptqbench.cli import main

main()
