"""Training, evaluation and benchmarking tools built on the models and the runtime:
train, eval, data, calibrate, presets."""
