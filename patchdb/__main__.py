from patchdb.cli import main

main()
