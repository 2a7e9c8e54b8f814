from uncnn_rt.cli.app import main

main()
