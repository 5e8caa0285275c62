"""The benchmark and fidelity tooling of fusedops (not part of the library): `python bench/run.py`,
`python bench/fidelity.py`, `bash bench/gpu.sh`. It imports the library; the library never imports it."""
