from moewm.app.main import main

main()
