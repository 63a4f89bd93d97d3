"""python -m lightning_modules fit --config configs/sae/demo.yaml"""

from lightning_modules.cli import main

main()
