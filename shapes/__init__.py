"""The shapes world: the embedded example environment of the tiny recipe (numpy only, no model code).

    world.py     scene specs, captions, categories, the train / held-out split, rendering on a 64 x 64 canvas
    verifier.py  the verifiable reward: parses a rendered image back into objects and checks the caption

The model (policy/) learns from this world and the rewards wrap its verifier; the world imports neither.
"""
