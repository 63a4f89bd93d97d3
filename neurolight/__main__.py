"""python -m neurolight fit --config configs/sae/demo.yaml"""

from neurolight.cli.main import main

main()
