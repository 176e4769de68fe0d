"""The measurements of benchmarks/benchmark.py, one module each, and the report that puts them in one table.

- common: the configurations, params.yaml, the compute profile a child runs under, the detector of a config;
- run: the child processes (one per measurement) and the order a (config, size) pair runs them in;
- prepare: the generated source, prepare's images/s and stored bytes, the encoders;
- train: Trainer samples/s against 128-token padding, and full against frozen-encoder epochs;
- infer: inference images/s against one-image-at-a-time and against the vision encoder alone;
- preprocess: decode + image processor images/s of one DataLoader worker;
- detect: `aigid detect one.jpg` as a whole process, and the portable detector's images/s;
- decode: peak memory of detect, the served model and the page on 9000x9000 PNGs, detect's images/s on JPEGs;
- report: the table.

A child process imports only its step's module (run.STEPS), so that its peak memory is its own step's; prepare.py
and train.py, whose steps need different parts, import torch, transformers and aigid inside the functions that
use them. The parent process imports no measurement module: torch is first imported in a child, after the parent
has set the compute profile's environment (which torch reads when it is first imported).
"""
