"""EasyGen's server: a Gradio web demo and an OpenAI-compatible API on one model, in one process.

    python -m easygen.serve [key=value ...]      = python run.py stage=serve [key=value ...]

Needs the serve extra (`pip install -e ".[serve]"`). The modules: engine.py (the model and its line of
jobs), api.py (FastAPI, /v1), web.py (Gradio Blocks at /); the stage program is easygen/stages/serve.py.
This package's __init__ imports nothing heavy: the plain-package import check (tests/test_layering.py)
walks it.
"""
