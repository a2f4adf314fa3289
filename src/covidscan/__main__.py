from covidscan.cli import main

main()
