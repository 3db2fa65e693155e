"""The stage programs behind `run.py` (Hydra configs in `conf/`): `train` (bidiffuser, pretrain,
instruct), `extract`, `evaluate`, `chat`, `recipe` (`stage=all`), plus the `export` and `consolidate`
command-line tools. They build objects from the config and call into `easygen.lit` and the plain models."""
