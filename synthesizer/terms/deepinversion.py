"""DeepInversion's terms, the paper's loss: feature statistics, class, total variation, image norm."""
import torch
import torch.nn.functional as F

from synthesizer.stat_norm import matching_loss
from synthesizer.terms import TermInputs, loss_term


@loss_term("statistics")
def statistics(inputs: TermInputs) -> torch.Tensor:
    """The teacher's batch moments in every stat layer against the DP statistics."""
    return matching_loss(inputs.teacher)


@loss_term("class")
def class_term(inputs: TermInputs) -> torch.Tensor:
    """Cross-entropy of the teacher's prediction to each image's target."""
    return F.cross_entropy(inputs.logits, inputs.targets)


@loss_term("smoothness")
def smoothness(inputs: TermInputs) -> torch.Tensor:
    """Total variation: the L2 norms of the four neighbour differences."""
    x = inputs.images
    return inputs.repeat_scale * (
        torch.norm(x[:, :, :, :-1] - x[:, :, :, 1:]) + torch.norm(x[:, :, :-1, :] - x[:, :, 1:, :])
        + torch.norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:]) + torch.norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:]))


@loss_term("image_norm")
def image_norm(inputs: TermInputs) -> torch.Tensor:
    """The L2 norm of the images themselves."""
    return inputs.repeat_scale * torch.norm(inputs.images)
