"""The predicate model (`predicate`) and the sampler that runs the collectors in order and then the model.
"""
