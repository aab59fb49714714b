"""The mask learner: Gumbel-sigmoid weight masks trained with a straight-through estimator."""
