from mbatch.cli import main

main()
