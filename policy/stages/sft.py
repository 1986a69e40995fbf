"""Stage: supervised fine-tuning — continued next-scale training of a pretrained policy on a curated subset
(by default the harder count / position / two-object prompts).

    python -m policy.stages.sft configs/stages/shapes-sft.yaml [key=value ...]
"""
from __future__ import annotations

import sys

from pydantic import Field, model_validator

from policy.stages.common import main
from policy.stages.pretrain import PretrainConfig, train_fn


class SFTConfig(PretrainConfig):
    categories: list[str] | None = Field(["count", "position", "two-object"],
                                         description="restrict the prompts (the curated subset)")

    @model_validator(mode="after")
    def _needs_policy(self):
        if not self.policy_path:
            raise ValueError("policy_path: SFT continues from a pretrained policy directory")
        return self


if __name__ == "__main__":
    sys.exit(main(SFTConfig, train_fn, sys.argv[1:]))
