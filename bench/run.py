"""The benchmark suite, as `python -m fusedops bench` (same options; see fusedops/bench.py):

    python bench/run.py [--op ce bn train] [--quick] [--out DIR]

Writes bench/results/{cross_entropy,batch_norm,train}.{md,csv,png}.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fusedops
from fusedops.__main__ import main

sys.exit(main(["bench", *sys.argv[1:]]))
