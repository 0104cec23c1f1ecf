from analysis.predictor.cli import main

main()
