from lnull.cli import main

main()
