"""Encoder training: histology augmentations, contrastive losses, `features pretrain` and `features finetune`."""
