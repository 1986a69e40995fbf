"""The stages before RL, each a Ray Train `TorchTrainer` job: tokenizer, pretrain (alignment -> progressive),
SFT, and the reward model. Run as `python -m policy.stages.<stage> CONFIG [key=value ...]`."""
