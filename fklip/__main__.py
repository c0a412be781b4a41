from fklip.cli import main

main()
