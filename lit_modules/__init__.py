"""Lightning pieces that train EasyGen's models: one LightningModule per trainable model family
(`BiDiffuserModule`, `EasyGenModule`), the optimiser/scheduler builder, strategies, and the stage runner
behind `run.py`. The models themselves live in `easygen/` (plain PyTorch)."""
