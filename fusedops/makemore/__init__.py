"""The makemore demo and main job: the notebooks' character MLP trained on names.txt with fusedops layers
(data, model, training, sampling, the notebooks' gradient check, the command line). It imports the
library; the library never imports it."""
