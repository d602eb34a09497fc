"""The project's experiments: scripts that train and analyse the runs behind docs/studies/
(``python -m experiments.NAME --help``). Library code lives in src/jestclip; speed and memory measurements in
benchmarks/."""
