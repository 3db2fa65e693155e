"""Lightning pieces that train EasyGen's models: one LightningModule per trainable model family
(`BiDiffuserModule`, `EasyGenModule`, `EasyGenT5Module` for the FlanT5 Mid-Align variant), the
optimiser/scheduler builder, strategies and FSDP2 sharding.
The models themselves are plain PyTorch in the rest of `easygen/`, which never imports this package."""
