from moewm.app import main

main()
