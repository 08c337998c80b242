from nswrap.cli import main

main()
