from moewm.bench.cli import main

main()
