"""Rewards: the reward-function protocol and plug-ins, built-in rewards, and the batched Ray Serve reward service.

    base.py     protocol, output checks, loading by name / entry point (nextscale.rewards) / import path
    builtin.py  verifier (shapes world), clip_score (open_clip), http (a user's scoring server)
    config.py   RewardsConfig (weighted rewards) and ServiceConfig (replicas, batching, HTTP, client retries)
    combine.py  CombinedReward: weighted sum, every component, timings; score_many merges requests
    wire.py     JSON + base64 PNG request/response format
    service.py  the Serve deployment (handle + HTTP), start_service
    client.py   RewardClient: timeout, retries with backoff, one-line errors

In a driver (Ray connected):

    cfg = load_config(RewardsConfig, "rewards.yaml")
    client = RewardClient(start_service(cfg), cfg)
    scored = client.score(images, prompts, shapes_metadata(specs))   # scored.total (B,), scored.components
"""
