"""The embedded toy worlds: still shapes (images) and moving shapes (video clips), chosen by ``toy.world``."""

from mmalign.toy import moving, shapes

# each world module has SPLITS (train / val / test scenes) and prompts(split)
WORLDS = {"shapes": shapes, "moving_shapes": moving}
