from weightship.cli.app import main

main()
